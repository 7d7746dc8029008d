"""Training-step speed (SFT / next-token step): achieved model FLOP/s over the machine's.

  python bench/train_step.py [--size cpu|gpu] [--moe] [--moe_impl ragged] [--iters 5] [--microbatches 1]

One jitted r1jax training step (sft.make_step: forward, backward, AdamW with clipping,
non-finite guard, MoE bias update), buffers donated as in the stage loop. Model FLOPs
are counted from the config's shapes (r1jax/flops.py: 6 x active params per token plus
causal attention), so the MoE step is charged for its active parameters only. MFU =
achieved model FLOP/s / the measured matmul FLOP/s of bench/ceilings.py in this run.

Sizes: "cpu" is the sampler issue's workload model (vocab 512, d_model 256, 4 layers,
4 heads / 2 KV, head_dim 64, MLP 512, fp32) on a GRPO-shaped batch of 64 rows x 160
tokens; "gpu" is a ~1.1B dense model (d_model 2048, 16 layers, 16 heads / 8 KV, head_dim
128, MLP 8192, vocab 32768) in bf16 compute over fp32 params, 8 rows x 1024 tokens, and
its MoE twin (12 layers, 16 experts top-2 + 1 shared, expert MLP 2048). Peak memory is the
compiled memory analysis on accelerators and the process's peak RSS on CPU; temporaries
are the compiled step's scratch buffers (activations, gradients) on every backend.
--microbatches K sums the step's gradient over K passes of rows / K (train.microbatches,
r1jax/microbatch.py); the default is the size's: 8 on "cpu" (1.4x faster than one pass
there, bench/RESULTS.md, session 11), 1 on "gpu". The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import ceilings  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import flops, sft  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import state as state_lib  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.model.config import ModelConfig  # noqa: E402  pylint: disable=wrong-import-position

SIZES = {
    "cpu": dict(model=dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                           d_ff=512, qk_norm=True, dtype="float32"),
                moe=dict(n_experts=8, top_k=2, moe_d_ff=512, router="softmax"),
                rows=64, seq_len=160, microbatches=8),
    "gpu": dict(model=dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128,
                           d_ff=8192, dtype="bfloat16"),
                moe=dict(n_layers=12, n_experts=16, top_k=2, n_shared_experts=1, moe_d_ff=2048, router="sigmoid"),
                rows=8, seq_len=1024, microbatches=1),
}


def model_config(size: str, moe: bool, moe_impl: str | None = None) -> ModelConfig:
  spec = SIZES[size]
  kw = dict(spec["model"], **(spec["moe"] if moe else {}))
  if moe and moe_impl:
    kw["moe_impl"] = moe_impl
  return ModelConfig(**kw)


def random_batch(cfg: ModelConfig, rows: int, seq_len: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (rows, seq_len), dtype=np.int32)
  return dict(tokens=tokens, loss_mask=np.ones_like(tokens), segment_ids=np.ones_like(tokens),
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)))


def peak_memory_bytes(compiled) -> float | None:
  """Accelerators: the compiled step's peak (arguments + outputs + temporaries - aliased)."""
  if jax.default_backend() == "cpu":
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def temp_bytes(compiled) -> float | None:
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def measure(cfg: ModelConfig, rows: int, seq_len: int, iters: int = 5, microbatches: int = 1) -> dict:
  model = state_lib.create_model(cfg, seed=0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
  graphdef, st = state_lib.create_state(model, tx)
  del model
  step = jax.jit(sft.make_step(graphdef, tx, bias_rate=1e-3 if cfg.is_moe else 0.0, microbatches=microbatches),
                 donate_argnums=0)
  batch = jax.device_put(random_batch(cfg, rows, seq_len))
  start = time.perf_counter()
  compiled = step.lower(st, batch).compile()
  compile_s = time.perf_counter() - start
  st, m = compiled(st, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    st, m = compiled(st, batch)
    jax.block_until_ready((st, m))
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  tokens = rows * seq_len
  model_flops = flops.train_flops(cfg, tokens, seq_len)
  return dict(step_s=step_s, compile_s=compile_s, tokens=tokens, tokens_per_s=tokens / step_s,
              model_flops=model_flops, flops_per_s=model_flops / step_s,
              active_params=flops.active_matmul_params(cfg), loss=float(m["loss"]),
              peak_memory_bytes=peak_memory_bytes(compiled), temp_bytes=temp_bytes(compiled))


def run(size: str, moe: bool, moe_impl: str | None, iters: int, ceiling: dict | None = None,
        microbatches: int | None = None) -> dict:
  cfg = model_config(size, moe, moe_impl)
  spec = SIZES[size]
  microbatches = microbatches or spec["microbatches"]
  r = measure(cfg, spec["rows"], spec["seq_len"], iters, microbatches)
  ceiling = ceiling or ceilings.measure(dtype=cfg.dtype)
  r.update(size=size, moe=moe, moe_impl=cfg.moe_impl if moe else None, dtype=cfg.dtype,
           rows=spec["rows"], seq_len=spec["seq_len"], microbatches=microbatches,
           matmul_flops_per_s=ceiling["matmul_flops_per_s"],
           mfu=r["flops_per_s"] / ceiling["matmul_flops_per_s"])
  return r


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="gpu" if jax.default_backend() != "cpu" else "cpu", choices=tuple(SIZES))
  parser.add_argument("--moe", action="store_true")
  parser.add_argument("--moe_impl", default=None, help="ragged | blocked | pallas | dense (MoE only)")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--microbatches", type=int, default=None,
                      help="gradient accumulation passes (train.microbatches; default: the size's)")
  args = parser.parse_args()
  r = run(args.size, args.moe, args.moe_impl, args.iters, microbatches=args.microbatches)
  mem, temp = r["peak_memory_bytes"], r["temp_bytes"]
  print(f"{'moe/' + r['moe_impl'] if r['moe'] else 'dense'} {r['dtype']} {r['rows']}x{r['seq_len']} "
        f"in {r['microbatches']} pass(es): "
        f"{r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, {r['flops_per_s'] / 1e12:.3f} TFLOP/s "
        f"= {100 * r['mfu']:.1f}% of matmul {r['matmul_flops_per_s'] / 1e12:.3f}; "
        f"peak {mem / 2**30 if mem else float('nan'):.2f} GiB, temporaries "
        f"{temp / 2**20 if temp else float('nan'):.0f} MiB; compile {r['compile_s']:.1f} s")
  print(json.dumps(dict(bench="train_step", **r)))


if __name__ == "__main__":
  main()
