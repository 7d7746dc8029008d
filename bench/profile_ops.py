"""Where a GRPO phase spends its time, per XLA operation (the tool behind bench/NOTES.md).

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
      python bench/profile_ops.py {update,reference,rollout} [--moe] [--top 30]

Builds bench/grpo_step.py's CPU workload, compiles the chosen phase, runs it once under
`jax.profiler`, and sums the trace's events per JAX operation (the `op_name` metadata
of the compiled HLO instructions; one operation can be several instructions, e.g. one
per layer), shown with the shape one of its instructions writes (--by_shape: one row
per operation and output shape). Without the XLA flag, XLA:CPU records no per-operation
events and the table is empty. Events that contain others (while loops, conditionals,
the thunk executor) are left out, so the milliseconds add up to thread time: operations
that run side by side on two cores both count.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from bench import grpo_step  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.sampling import sampler  # noqa: E402  pylint: disable=wrong-import-position

CONTAINERS = ("cond", "while", "Thunk", "Slinky", "$", "wide.", "region", "call", "body", "end:")


def build(phase: str, moe: bool):
  """(compiled executable, zero-argument call) for one phase of the CPU GRPO step."""
  s = grpo_step.setup("cpu", moe)
  w, st = s["w"], s["st"]
  key = sampler.as_typed_key(jax.random.key(0))
  budget = sampler.row_budgets(None, w["prompts"] * w["group"], w["new_tokens"])
  rollout_args = (s["graphdef"], (st.params, st.other), jnp.asarray(s["ids"]), jnp.asarray(s["mask"]), key,
                  budget, w["group"], s["params"])
  if phase == "rollout":
    compiled = sampler._generate.lower(*rollout_args).compile()  # pylint: disable=protected-access
    return compiled, lambda: compiled(*rollout_args[1:6])
  batch = grpo_step.make_batch(s, jax.device_get(sampler._generate(*rollout_args)))  # pylint: disable=protected-access
  batch["ref_logp"] = np.asarray(jax.jit(s["ref_logp"])(s["ref"], st.other, batch))
  batch = jax.device_put(batch)
  if phase == "reference":
    compiled = jax.jit(s["ref_logp"]).lower(s["ref"], st.other, batch).compile()
    return compiled, lambda: compiled(s["ref"], st.other, batch)
  compiled = jax.jit(s["update"]).lower(st, batch).compile()
  return compiled, lambda: compiled(st, batch)


def op_table(compiled, call, top: int, by_shape: bool = False):
  """Runs `call` once under the profiler; returns [(ms, count, op, shape)] and the total.

  by_shape: one row per operation and output shape (e.g. the projections, which share
  one op_name, apart)."""
  from jax._src.lib import _profile_data  # pylint: disable=import-outside-toplevel
  meta = {}
  for line in compiled.as_text().split("\n"):
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name="([^"]+)"', line)
    if m:
      meta[m.group(1)] = (m.group(3), m.group(2))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    jax.block_until_ready(call())
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
  ns, count, shape = collections.Counter(), collections.Counter(), {}
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name.startswith(CONTAINERS) or ev.name not in meta:
          continue
        op, out_shape = meta[ev.name]
        op = re.sub(r"\d+", "#", re.sub(r"jit\([^)]*\)/", "", op))[:90]
        op = (op, out_shape if by_shape else None)
        ns[op] += ev.duration_ns
        count[op] += 1
        shape[op] = out_shape
  rows = [(v / 1e6, count[k], k[0], shape[k]) for k, v in ns.most_common(top)]
  return rows, sum(ns.values()) / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("phase", choices=("update", "reference", "rollout"))
  parser.add_argument("--moe", action="store_true")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--by_shape", action="store_true", help="one row per operation and output shape")
  args = parser.parse_args()
  if "xla_cpu_enable_xprof_traceme=true" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("profile_ops: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (XLA:CPU records no "
             "per-operation events without it)")
  compiled, call = build(args.phase, args.moe)
  jax.block_until_ready(call())
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  wall = time.perf_counter() - t0
  rows, total = op_table(compiled, call, args.top, args.by_shape)
  print(f"{args.phase} ({'moe' if args.moe else 'dense'}): {wall:.3f} s wall; {total:.0f} ms of operation "
        f"time in the trace (thread time: concurrent operations both count)")
  print(f"{'ms':>9s} {'share':>6s} {'calls':>6s}  operation (output shape)")
  for ms, n, op, out_shape in rows:
    print(f"{ms:9.1f} {ms / total:6.1%} {n:6d}  {op} {out_shape}")


if __name__ == "__main__":
  main()
