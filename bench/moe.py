"""MoE layer cost: compiled FLOPs over the ideal active FLOPs, and wall time per token.

  python bench/moe.py [--tokens 1024] [--d_model 256] [--moe_d_ff 128] [--impls blocked,ragged,dense]
                      [--ep]   # also the 8-way expert-parallel layer on 8 simulated CPU devices

For E = 8, 16, 32, 64 routed experts and top-k 2, 4, 8, one MoE layer forward (router +
routed experts, no shared expert) is jitted and its compiled cost read from
`cost_analysis()['flops']`. The ideal is what the chosen experts must compute:
  tokens * k * 3 matmuls * 2 * d_model * moe_d_ff  +  the router, tokens * 2 * d_model * E.
Prints a table and, as its last line, one JSON object whose "moe_flop_ratio_max" is the
worst ratio of the headline implementation (the first of --impls).

What XLA reports, honestly:
  ragged: XLA:CPU has no grouped matmul; it expands lax.ragged_dot into a dense dot
    over all E groups with a row mask, so the ratio is ~E/k * k = E... per matmul it
    computes every group for every row (~E x) and the wall time grows the same way:
    the cost analysis is not wrong, the work is really done. On TPU ragged_dot is native.
  blocked: gathers and one batched matmul, no loops, so cost_analysis sees all of it.
  dense: every expert on every token, E/k x the active FLOPs.
  pallas: not measured. In interpret mode a Pallas kernel is a while loop and XLA's cost
    analysis counts a loop body once, so its number would be meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--ep" in sys.argv:  # 8 simulated devices, set before JAX starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from r1jax import parallel  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.model.moe import MoE  # noqa: E402

EXPERTS = (8, 16, 32, 64)
TOP_K = (2, 4, 8)


def ideal_flops(tokens: int, cfg: ModelConfig) -> float:
  experts = tokens * cfg.top_k * 3 * 2 * cfg.d_model * cfg.moe_d_ff
  router = tokens * 2 * cfg.d_model * cfg.n_experts
  return float(experts + router)


def measure(cfg: ModelConfig, tokens: int, mesh=None, repeats: int = 3):
  """(compiled FLOPs per device, seconds per call) of one MoE layer forward."""
  make = lambda: MoE(cfg, nnx.Rngs(0))
  model = make() if mesh is None else parallel.create_sharded_model(make, mesh)
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(1), (tokens // 64, 64, cfg.d_model))
  if mesh is not None:
    x = jax.device_put(x, parallel.batch_sharding(mesh, 3))
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  with jax.set_mesh(mesh) if mesh is not None else _null():
    compiled = fn.lower(state, x).compile()
  flops = compiled.cost_analysis()["flops"]
  compiled(state, x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(state, x).block_until_ready()
    times.append(time.perf_counter() - start)
  return flops, sorted(times)[len(times) // 2]


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--moe_d_ff", type=int, default=128)
  ap.add_argument("--impls", default="blocked,ragged,dense")
  ap.add_argument("--ep", action="store_true")
  args = ap.parse_args()
  impls = args.impls.split(",")
  rows, worst = [], {}
  print(f"one MoE layer forward, {args.tokens} tokens, d_model {args.d_model}, moe_d_ff {args.moe_d_ff}, "
        f"backend {jax.default_backend()}")
  print(f"{'impl':>8} {'mesh':>6} {'cf':>4} {'E':>3} {'k':>2} {'flops/ideal':>11} {'us/token':>9}")
  runs = [(impl, None, 0.0) for impl in impls]
  if args.ep:
    mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=8, tensor=1))
    runs += [(impls[0], mesh, 0.0), (impls[0], mesh, 1.25)]
  for impl, mesh, cf in runs:
    for e in EXPERTS:
      for k in TOP_K:
        cfg = ModelConfig(d_model=args.d_model, n_experts=e, top_k=k, moe_d_ff=args.moe_d_ff,
                          moe_impl=impl, capacity_factor=cf)
        flops, seconds = measure(cfg, args.tokens, mesh)
        devices = 1 if mesh is None else mesh.size
        ratio = flops * devices / ideal_flops(args.tokens, cfg)
        label = "1" if mesh is None else f"ep{mesh.shape['expert']}"
        print(f"{impl:>8} {label:>6} {cf:>4} {e:>3} {k:>2} {ratio:>11.3f} {1e6 * seconds / args.tokens:>9.2f}",
              flush=True)
        rows.append(dict(impl=impl, mesh=label, capacity_factor=cf, n_experts=e, top_k=k,
                         flop_ratio=round(ratio, 4), us_per_token=round(1e6 * seconds / args.tokens, 3)))
        key = impl if mesh is None else f"{impl}@{label}/cf{cf}"
        worst[key] = max(worst.get(key, 0.0), round(ratio, 4))
  print(json.dumps(dict(moe_flop_ratio_max=worst[impls[0]], impl=impls[0], tokens=args.tokens,
                        d_model=args.d_model, moe_d_ff=args.moe_d_ff, flop_ratio_max_by_impl=worst)))


if __name__ == "__main__":
  main()
