"""Time the grouped-matmul kernel against lax.ragged_dot and a dense matmul.

  python bench/kernels.py [--shapes 512x64x128x8x2,...] [--iters 5] [--grad]

A shape is MxDxFxExk: M tokens routed top-k over E experts gives M*k rows, sorted by
expert, times [E, D, F] weights. "dense" is one [M*k, D] @ [D, F] matmul: the same
FLOPs with no grouping, the floor a grouped matmul aims at. On CPU the Pallas kernel
runs in interpret mode (slow by construction: it measures correctness plumbing, not
speed); on TPU/GPU it is compiled. With --grad each column times value-and-grad.
The last line printed is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.kernels import gmm as gmm_lib

DEFAULT_SHAPES = "256x64x128x8x2,512x128x256x16x2,1024x128x256x32x4"


def _time_ms(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _operands(m, d, f, e, k, dtype, seed=0):
  """Rows sorted by expert with the group sizes of a random top-k routing."""
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.choice(e, size=k, replace=False) for _ in range(m)])
  sizes = np.bincount(experts.reshape(-1), minlength=e)
  lhs = jnp.asarray(rng.normal(size=(m * k, d)), dtype)
  rhs = jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _maybe_grad(fn, grad: bool):
  if not grad:
    return jax.jit(fn)
  return jax.jit(jax.value_and_grad(lambda a, b, *rest: fn(a, b, *rest).astype(jnp.float32).sum(), argnums=(0, 1)))


def bench_shape(m, d, f, e, k, *, iters, grad, dtype, strategy):
  lhs, rhs, sizes = _operands(m, d, f, e, k, dtype)
  pallas = _maybe_grad(lambda a, b, gs: gmm_lib.gmm(a, b, gs, strategy=strategy), grad)
  ragged = _maybe_grad(gmm_lib.gmm_reference, grad)
  dense = _maybe_grad(lambda a, b: a @ b, grad)
  ref = gmm_lib.gmm_reference(lhs, rhs, sizes)
  out = jax.jit(lambda a, b, gs: gmm_lib.gmm(a, b, gs, strategy=strategy))(lhs, rhs, sizes)
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
  return dict(
      m=m, d=d, f=f, e=e, k=k, rows=m * k,
      pallas_ms=_time_ms(pallas, lhs, rhs, sizes, iters=iters),
      ragged_dot_ms=_time_ms(ragged, lhs, rhs, sizes, iters=iters),
      dense_ms=_time_ms(dense, lhs, rhs[0], iters=iters),
      max_abs_err=err,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxDxFxExk")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--grad", action="store_true", help="time value-and-grad instead of forward")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--strategy", default=None, choices=(None, *gmm_lib.STRATEGIES))
  args = parser.parse_args()

  backend = jax.default_backend()
  mode = "interpret" if backend == "cpu" else "compiled"
  rows = []
  header = f"{'M':>6} {'D':>5} {'F':>5} {'E':>4} {'k':>2} | {'pallas ms':>10} {'ragged ms':>10} {'dense ms':>9} | err"
  print(f"backend={backend} pallas={mode} dtype={args.dtype} {'fwd+bwd' if args.grad else 'fwd'}")
  print(header)
  print("-" * len(header))
  for shape in args.shapes.split(","):
    m, d, f, e, k = (int(x) for x in shape.split("x"))
    r = bench_shape(m, d, f, e, k, iters=args.iters, grad=args.grad, dtype=jnp.dtype(args.dtype),
                    strategy=args.strategy)
    rows.append(r)
    print(f"{m:>6} {d:>5} {f:>5} {e:>4} {k:>2} | {r['pallas_ms']:>10.2f} {r['ragged_dot_ms']:>10.2f} "
          f"{r['dense_ms']:>9.3f} | {r['max_abs_err']:.1e}")
  print(json.dumps(dict(bench="gmm", backend=backend, pallas_mode=mode, dtype=args.dtype, grad=args.grad,
                        results=rows)))


if __name__ == "__main__":
  main()
