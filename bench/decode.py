"""Decode speed against the memory-bandwidth roofline.

  python bench/decode.py [--size cpu|gpu] [--rows 64] [--prompt_len 128] [--new_tokens 256]

One decode step must read every weight once (bf16 here: the sampler's copy of the
policy) and each row's filled KV cache; at batch sizes used for GRPO rollouts that is
far below the arithmetic ceiling, so decode is bandwidth-bound and its roofline is
  tokens/s <= rows x copy bandwidth / bytes per step,
  bytes per step = weight bytes + rows x (prompt + mean generated position) x cache bytes per position,
with the copy bandwidth measured in the same run (bench/ceilings.py). Prefill is excluded:
the prompt is prefilled once in a warm-up-sized call and the timed figure is the decode
loop only (time(N tokens) - time(1 token), both full `generate` calls). EOS is never
drawn, so every row decodes all N tokens. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import ceilings  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import memory  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.model.config import ModelConfig  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.model.transformer import Transformer  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.sampling.sampler import SamplingParams, generate  # noqa: E402  pylint: disable=wrong-import-position

SIZES = {
    "cpu": dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512,
                dtype="float32"),
    # ~1.1B dense, bf16 weights: 2.2 GB a step against ~4.3 TB/s is ~0.5 ms a step.
    "gpu": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128,
                d_ff=8192, dtype="bfloat16"),
}
DEFAULT_ROWS = {"cpu": 64, "gpu": 64}


def run(size: str, rows: int, prompt_len: int, new_tokens: int, iters: int = 3, ceiling: dict | None = None) -> dict:
  cfg = ModelConfig(**SIZES[size])
  model = jax.jit(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0))))  # initialise on device
  graphdef, state = model()
  # The sampler's copy of the policy in the compute dtype: every matmul casts its weight
  # to it anyway, so decode reads half the bytes of fp32 master weights for the same result.
  state = jax.tree.map(lambda x: x.astype(cfg.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.vocab_size, size=(rows, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)

  def call(n):
    params = SamplingParams(max_new_tokens=n, temperature=1.0, eos_ids=(cfg.vocab_size,))
    return lambda: generate(graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(1),
                            params=params)

  full_s = ceilings.time_call(call(new_tokens), iters=iters)
  one_s = ceilings.time_call(call(1), iters=iters)
  decode_s = max(full_s - one_s, 1e-9)
  steps = new_tokens - 1
  mean_ctx = prompt_len + new_tokens / 2
  step_bytes = weight_bytes + rows * mean_ctx * cfg.n_layers * memory.kv_slot_bytes(cfg)
  ceiling = ceiling or ceilings.measure()
  bw = ceiling["copy_bytes_per_s"]
  tps = rows * steps / decode_s
  roofline_tps = rows * bw / step_bytes
  return dict(size=size, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens, dtype=cfg.dtype,
              weight_bytes=weight_bytes, step_bytes=step_bytes, decode_seconds=decode_s,
              step_ms=1e3 * decode_s / steps, tokens_per_s=tps, achieved_bytes_per_s=step_bytes * steps / decode_s,
              copy_bytes_per_s=bw, roofline_tokens_per_s=roofline_tps, roofline_fraction=tps / roofline_tps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="gpu" if jax.default_backend() != "cpu" else "cpu", choices=tuple(SIZES))
  parser.add_argument("--rows", type=int, default=None)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  r = run(args.size, args.rows or DEFAULT_ROWS[args.size], args.prompt_len, args.new_tokens, args.iters)
  print(f"decode {r['size']} {r['dtype']} {r['rows']} rows: {r['step_ms']:.3f} ms/step, {r['tokens_per_s']:,.0f} tok/s; "
        f"{r['step_bytes'] / 1e9:.3f} GB/step -> {r['achieved_bytes_per_s'] / 1e9:.0f} GB/s = "
        f"{100 * r['roofline_fraction']:.1f}% of the copy bandwidth {r['copy_bytes_per_s'] / 1e9:.0f} GB/s")
  print(json.dumps(dict(bench="decode", **r)))


if __name__ == "__main__":
  main()
