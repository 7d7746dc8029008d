"""The MoE Pallas kernels against their references: correctness first, then speed.

  python bench/kernels.py [--shapes 512x64x128x8x2,...] [--iters 5] [--dtype bfloat16]
                          [--strategy visits] [--configs visits:128x64x128x8x3,visits:64x64x128x4x3]

A shape is MxDxFxExk: M tokens routed top-k over E experts gives M*k rows, sorted by
expert (a random routing: uneven groups, sometimes empty ones), times [E, D, F]
weights. For each shape:
  check  gmm values and both gradients (d lhs through gmm with rhs transposed, d rhs
         through tgmm) against lax.ragged_dot on fp32 copies of the same inputs, as
         relative errors ||out - ref|| / ||ref|| on fresh random inputs (an unwritten
         block holds garbage, which shows as a large error or NaN). The routing
         kernel against `route` (experts equal, weights close) on DeepSeek-V3's
         group-limited sigmoid router.
  speed  forward and forward+backward of the Pallas kernel, lax.ragged_dot, and one
         dense [M*k, D] @ [D, F] matmul of the same FLOPs (the floor a grouped matmul
         aims at), as ms and TFLOP/s; "vs dense" = dense time / kernel time.
On CPU the kernels run in interpret mode (slow by construction: the check is what
counts there); on GPU / TPU they are compiled (Triton / Mosaic). The last line printed
is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ceilings import time_call  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.kernels import gmm as gmm_lib  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.kernels import routing  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.model.moe import route  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_SHAPES = {"cpu": "256x64x128x8x2,512x128x256x16x2",
                  # DeepSeek-V3-like expert FFN slices: d_model 7168 -> 2048 is too big for a
                  # quick run; 4096 x 2048 (and its transpose) with 8-16k routed rows fills an H200.
                  "gpu": "4096x4096x2048x16x2,8192x4096x2048x64x2,4096x2048x4096x32x4"}


def operands(m, d, f, e, k, dtype, seed):
  """Rows sorted by expert with the group sizes of a random top-k routing."""
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.choice(e, size=k, replace=False) for _ in range(m)])
  sizes = np.bincount(experts.reshape(-1), minlength=e)
  lhs = jnp.asarray(rng.normal(size=(m * k, d)), dtype)
  rhs = jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_gmm(m, d, f, e, k, dtype, kernel, seed) -> dict:
  """Relative errors of value, d lhs and d rhs against fp32 ragged_dot (fresh inputs)."""
  lhs, rhs, sizes = operands(m, d, f, e, k, dtype, seed)
  cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(m * k, f)), dtype)

  def vjp(fn, a, b):
    out, pull = jax.vjp(lambda x, y: fn(x, y, sizes), a, b)
    return (out,) + pull(cot.astype(out.dtype))

  got = jax.jit(lambda a, b: vjp(kernel, a, b))(lhs, rhs)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda a, b: vjp(gmm_lib.gmm_reference, a, b))(f32(lhs), f32(rhs))
  return dict(out_rel_err=rel_err(got[0], want[0]), dlhs_rel_err=rel_err(got[1], want[1]),
              drhs_rel_err=rel_err(got[2], want[2]))


def check_routing(n: int, seed: int) -> dict:
  kw = dict(top_k=8, router="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5)
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(2 * rng.normal(size=(n, 256)), jnp.float32)
  bias = jnp.asarray(0.3 * rng.normal(size=(256,)), jnp.float32)
  fn = jax.jit(lambda l, b: routing.route_pallas(l, b, **kw))
  ref = jax.jit(lambda l, b: route(l, b, **kw))
  weights, experts = fn(logits, bias)
  want_w, want_e = ref(logits, bias)
  return dict(route_tokens=n, route_experts_equal=bool(np.array_equal(experts, want_e)),
              route_weights_max_abs_err=float(jnp.max(jnp.abs(weights - want_w))),
              route_pallas_ms=1e3 * time_call(fn, logits, bias), route_reference_ms=1e3 * time_call(ref, logits, bias))


def value_and_grad(fn):
  return jax.jit(jax.value_and_grad(lambda a, b, *rest: fn(a, b, *rest).astype(jnp.float32).sum(), argnums=(0, 1)))


def time_gmm(m, d, f, e, k, dtype, kernels: dict, iters) -> dict:
  """ms and TFLOP/s of each Pallas config, ragged_dot and the dense matmul."""
  lhs, rhs, sizes = operands(m, d, f, e, k, dtype, seed=0)
  flops = 2.0 * m * k * d * f
  fns = dict(kernels, ragged=gmm_lib.gmm_reference, dense=lambda a, b, gs: a @ b[0])
  r = {}
  for name, fn in fns.items():
    args = (lhs, rhs, sizes)
    r[f"{name}_fwd_ms"] = 1e3 * time_call(jax.jit(fn), *args, iters=iters)
    r[f"{name}_fwdbwd_ms"] = 1e3 * time_call(value_and_grad(fn), *args, iters=iters)
    r[f"{name}_fwd_tflops"] = flops / r[f"{name}_fwd_ms"] * 1e-9
    r[f"{name}_fwdbwd_tflops"] = 3 * flops / r[f"{name}_fwdbwd_ms"] * 1e-9
  best = min(kernels, key=lambda n: r[f"{n}_fwdbwd_ms"])
  r.update(best=best, pallas_fwd_ms=r[f"{best}_fwd_ms"], pallas_fwdbwd_ms=r[f"{best}_fwdbwd_ms"],
           pallas_fwd_tflops=r[f"{best}_fwd_tflops"], pallas_fwdbwd_tflops=r[f"{best}_fwdbwd_tflops"])
  r["pallas_vs_dense_fwd"] = r["dense_fwd_ms"] / r["pallas_fwd_ms"]
  r["pallas_vs_dense_fwdbwd"] = r["dense_fwdbwd_ms"] / r["pallas_fwdbwd_ms"]
  r["pallas_vs_ragged_fwdbwd"] = r["ragged_fwdbwd_ms"] / r["pallas_fwdbwd_ms"]
  return r


def parse_configs(configs: str | None, strategy: str | None = None) -> dict:
  """'[strategy:]128x64x128x4x3,...' (block_m x block_k x block_f x num_warps x num_stages)
  -> gmm keyword arguments by name; a config without a strategy takes --strategy."""
  if not configs:
    return {"pallas": dict(strategy=strategy)}
  out = {}
  for c in configs.split(","):
    name, _, blocks = c.rpartition(":")
    bm, bk, bf, w, st = (int(x) for x in blocks.split("x"))
    out[f"pallas_{c}"] = dict(strategy=name or strategy, block_m=bm, block_k=bk, block_f=bf, num_warps=w,
                              num_stages=st)
  return out


def run(shapes: str | None = None, dtype: str | None = None, iters: int = 5, strategy=None,
        configs: str | None = None, seed: int = 1, routing_tokens: int | None = None) -> dict:
  backend = jax.default_backend()
  dtype = dtype or ("float32" if backend == "cpu" else "bfloat16")
  shapes = shapes or DEFAULT_SHAPES["cpu" if backend == "cpu" else "gpu"]
  if routing_tokens is None:
    routing_tokens = 4096 if backend != "cpu" else 64
  routing_check = check_routing(routing_tokens, seed) if routing_tokens else {}
  print(f"routing: {routing_check}", flush=True)
  settings = parse_configs(configs, strategy)
  kernels = {name: (lambda a, b, gs, kw=kw: gmm_lib.gmm(a, b, gs, **kw))
             for name, kw in settings.items()}
  rows = []
  for i, shape in enumerate(shapes.split(",")):
    m, d, f, e, k = (int(x) for x in shape.split("x"))
    row = dict(m=m, d=d, f=f, e=e, k=k, rows=m * k)
    working = {}
    for j, (name, kernel) in enumerate(kernels.items()):
      try:
        err = check_gmm(m, d, f, e, k, jnp.dtype(dtype), kernel, seed + 10 * i + j)
      except Exception as exc:  # pylint: disable=broad-except  # e.g. a tile that exceeds shared memory
        row[f"{name}_failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{shape} {name}: {row[name + '_failed']}", file=sys.stderr)
        continue
      working[name] = kernel
      row.update({f"{name}_{key}": v for key, v in err.items()})
      row.update({key: max(v, row.get(key, 0.0)) for key, v in err.items()})  # worst over configs
    if not working:
      raise RuntimeError(f"no Pallas config compiled for shape {shape}: {row}")
    row.update(time_gmm(m, d, f, e, k, jnp.dtype(dtype), working, iters))
    rows.append(row)
    print(f"{shape}: fastest {row['best']} fwd / fwd+bwd ms: pallas {row['pallas_fwd_ms']:.3f} / "
          f"{row['pallas_fwdbwd_ms']:.3f}, dense {row['dense_fwd_ms']:.3f} / {row['dense_fwdbwd_ms']:.3f}, ragged "
          f"{row['ragged_fwd_ms']:.3f} / {row['ragged_fwdbwd_ms']:.3f}; rel err out {row['out_rel_err']:.1e} "
          f"dlhs {row['dlhs_rel_err']:.1e} drhs {row['drhs_rel_err']:.1e}", flush=True)
  return dict(bench="kernels", backend=backend, pallas_mode="interpret" if backend == "cpu" else "compiled",
              dtype=dtype, configs=settings, results=rows, **routing_check)


def print_table(r: dict) -> None:
  print(f"backend={r['backend']} pallas={r['pallas_mode']} dtype={r['dtype']} (pallas = the fastest of "
        f"{len(r['configs'])} config(s))")
  head = (f"{'M*k':>6} {'D':>5} {'F':>5} {'E':>3} | rel err out/dlhs/drhs | fwd ms pallas/ragged/dense | "
          f"fwd+bwd ms pallas/ragged/dense | pallas TFLOP/s f/fb | vs dense f/fb")
  print(head)
  print("-" * len(head))
  for x in r["results"]:
    print(f"{x['rows']:>6} {x['d']:>5} {x['f']:>5} {x['e']:>3} | "
          f"{x['out_rel_err']:.1e} {x['dlhs_rel_err']:.1e} {x['drhs_rel_err']:.1e} | "
          f"{x['pallas_fwd_ms']:8.3f} {x['ragged_fwd_ms']:8.3f} {x['dense_fwd_ms']:8.3f} | "
          f"{x['pallas_fwdbwd_ms']:8.3f} {x['ragged_fwdbwd_ms']:8.3f} {x['dense_fwdbwd_ms']:8.3f} | "
          f"{x['pallas_fwd_tflops']:7.2f} {x['pallas_fwdbwd_tflops']:7.2f} | "
          f"{x['pallas_vs_dense_fwd']:.2f} {x['pallas_vs_dense_fwdbwd']:.2f} {x['best']}")
  if len(r["configs"]) > 1:
    for x in r["results"]:
      print(f"  {x['rows']}x{x['d']}x{x['f']} E={x['e']}: " + ", ".join(
          f"{name[7:]} {x[name + '_fwd_ms']:.3f}/{x[name + '_fwdbwd_ms']:.3f} ms" if name + "_fwd_ms" in x
          else f"{name[7:]} failed" for name in r["configs"]))
  if "route_tokens" not in r:
    return
  print(f"routing kernel ({r['route_tokens']} tokens, 256 experts top-8, 8 groups): experts equal "
        f"{r['route_experts_equal']}, weights max err {r['route_weights_max_abs_err']:.1e}, "
        f"{r['route_pallas_ms']:.3f} ms vs reference {r['route_reference_ms']:.3f} ms")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=None, help="comma-separated MxDxFxExk")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
  parser.add_argument("--strategy", default=None, choices=(None, *gmm_lib.STRATEGIES))
  parser.add_argument("--configs", default=None,
                      help="Pallas settings to compare, comma-separated [strategy:]block_m x block_k x "
                           "block_f x num_warps x num_stages (default: the kernel's defaults)")
  parser.add_argument("--routing_tokens", type=int, default=None,
                      help="tokens for the routing-kernel check (0 skips it; default 4096, 64 on CPU)")
  args = parser.parse_args()
  r = run(args.shapes, args.dtype, args.iters, args.strategy, args.configs, routing_tokens=args.routing_tokens)
  print_table(r)
  print(json.dumps(r))


if __name__ == "__main__":
  main()
