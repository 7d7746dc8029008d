"""The peer for bench/sampler.py: google-tunix 0.1.7's vanilla sampler on the same workload.

Runs in its own venv (tunix may pin other jax/flax versions than r1jax):

  python3 -m venv /work/peer_venv
  /work/peer_venv/bin/pip install "jax[cpu]" google-tunix==0.1.7
  /work/peer_venv/bin/python bench/peer_tunix.py [--moe] [--iters 3]

bench/sampler.py starts it as a subprocess with --serve: after the warm-up it prints
"ready" and then times one call per "run" line on stdin, one JSON line each, so the
bench can interleave peer calls with its own on a shared, noisy machine. The
model is tunix's Qwen3 (the tunix model that has both a dense and an MoE variant) at the
issue's sizes: vocab 512, d_model 256, 4 layers, 4 heads / 2 KV heads, head_dim 64,
MLP 512, fp32; --moe makes every layer 8 experts top-2 (tunix runs its CPU MoE path).
Tunix has no group sharing, so the B*G prompt rows are passed as separate strings; the
tokenizer is a stand-in that maps "3 17 42" to ids, pad 0, no BOS, and the EOS id is
one past the vocabulary so every row decodes all its tokens.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


VOCAB = 512


class IdTokenizer:
  """Space-separated integers <-> ids: the prompts are already token ids."""

  def __init__(self, eos: int = 0):
    self._eos = eos

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 0  # falsy: tunix then prepends no BOS

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return 0


def add_workload_args(ap: argparse.ArgumentParser) -> None:
  """The workload flags both peer scripts take (bench/sampler.py's defaults)."""
  ap.add_argument("--moe", action="store_true")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)


def qwen3_config(moe: bool):
  """tunix's Qwen3 at the issue's sizes (module docstring); --moe: 8 experts top-2."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from tunix.models.qwen3 import model as qwen3  # pylint: disable=import-outside-toplevel
  return qwen3.ModelConfig(
      num_layers=4, vocab_size=VOCAB, embed_dim=256, hidden_dim=512, num_heads=4, head_dim=64,
      num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=False,
      num_experts=8 if moe else None, num_experts_per_tok=2 if moe else None,
      dtype=jnp.float32, param_dtype=jnp.float32)


def main():
  ap = argparse.ArgumentParser()
  add_workload_args(ap)
  ap.add_argument("--serve", action="store_true", help="time one call per 'run' line on stdin")
  args = ap.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tunix.generate import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  from tunix.models.qwen3 import model as qwen3  # pylint: disable=import-outside-toplevel

  vocab = VOCAB
  model = qwen3.Qwen3(qwen3_config(args.moe), rngs=nnx.Rngs(args.seed))
  cache = sampler_lib.CacheConfig(cache_size=args.prompt_len + args.new_tokens, num_layers=4,
                                  num_kv_heads=2, head_dim=64)
  sampler = sampler_lib.Sampler(model, IdTokenizer(), cache)
  rng = np.random.default_rng(args.seed)
  prompts = rng.integers(1, vocab, size=(args.prompts, args.prompt_len))
  strings = [" ".join(map(str, p)) for p in prompts for _ in range(args.group)]

  def run(seed):
    out = sampler(strings, max_generation_steps=args.new_tokens, max_prompt_length=args.prompt_len,
                  temperature=1.0, top_p=1.0, eos_tokens=[vocab], seed=seed, return_logprobs=True)
    return sum(len(t) for t in out.tokens)

  start = time.perf_counter()
  run(0)  # compile + warm up
  compile_s = time.perf_counter() - start
  if args.serve:
    print(json.dumps(dict(ready=True, compile_s=compile_s, jax=jax.__version__)), flush=True)
    for i, line in enumerate(sys.stdin):
      if line.strip() != "run":
        break
      start, cpu = time.perf_counter(), time.process_time()
      tokens = run(i + 1)
      print(json.dumps(dict(tokens=tokens, seconds=time.perf_counter() - start,
                            cpu_seconds=time.process_time() - cpu)), flush=True)
    return
  times, tokens = [], 0
  for i in range(args.iters):
    start = time.perf_counter()
    tokens = run(i + 1)
    times.append(time.perf_counter() - start)
  sec = statistics.median(times)
  print(f"tunix {jax.__version__}  {'moe' if args.moe else 'dense'}  tokens {tokens}  "
        f"median {sec:.3f}s  {tokens / sec:,.0f} tokens/s")
  print(json.dumps(dict(peer="google-tunix 0.1.7 vanilla sampler", tokens=tokens, seconds=times,
                        tokens_per_s=tokens / sec, best_tokens_per_s=tokens / min(times),
                        compile_s=compile_s)))


if __name__ == "__main__":
  main()
