"""The benchmark suite: every figure against the machine's ceilings and against the peer.

  python bench/run.py [--only sampler,grpo,train,moe,kernels] [--no_peer] [--iters 3] [--devices 1]

Runs, each in its own process (so peak RSS is per benchmark and one failure does not
hide the rest):
  ceilings   a large matmul's FLOP/s and a large copy's bytes/s (bench/ceilings.py)
  sampler    generated tokens/s and slot utilisation, dense and MoE, side by side with
             tunix's sampler when its venv exists (bench/sampler.py)
  grpo       one GRPO step split into rollout / reference / update, dense and MoE, with
             tunix's GrpoLearner on the same workload when its venv exists
             (bench/grpo_step.py, bench/peer_tunix_grpo.py)
  train      SFT training-step MFU, dense and MoE (bench/train_step.py)
  moe        the MoE layer's compiled-FLOP ratio over active FLOPs (bench/moe.py)
  kernels    the Pallas kernels checked against their references, and timed
             (bench/kernels.py; interpret mode on CPU)
Sizes follow the backend: CPU runs the sampler issue's small workload; on a GPU the
~1.1B bf16 models (see each script). The table is printed at the end; the last line is
one JSON object holding every figure (each script's own JSON under its name).

The peer runs from --peer_python (default /work/peer_venv/bin/python; set it up with
`python3 -m venv /work/peer_venv && /work/peer_venv/bin/pip install "jax[cpu]" google-tunix==0.1.7`).
Ratios are r1jax / peer for throughput and peer / r1jax for step time (> 1: r1jax faster).

--devices N (CPU) runs r1jax's sampler and GRPO step data-parallel over N simulated CPU
devices, the way r1jax uses several cores in one process; the peer stays one device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PEER = "/work/peer_venv/bin/python"
SECTIONS = ("ceilings", "sampler", "grpo", "train", "moe", "kernels")


def run_json(cmd, timeout: int, env=None) -> dict:
  """Runs a bench script; returns its last JSON line, or {"error": ...}."""
  start = time.perf_counter()
  print(f"$ {' '.join(cmd)}", flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout} s")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  for line in proc.stdout.splitlines():
    if not line.startswith("{"):
      print(f"  {line}", flush=True)
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f"exit {proc.returncode}: " + " | ".join(tail))
  out = json.loads(lines[-1])
  out["wall_s"] = time.perf_counter() - start
  return out


def py(script, *args):
  return [sys.executable, os.path.join(HERE, script), *args]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--no_peer", action="store_true")
  parser.add_argument("--peer_python", default=DEFAULT_PEER)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--devices", type=int, default=1,
                      help="CPU: r1jax's sampler and GRPO step data-parallel over this many devices")
  args = parser.parse_args()
  only = set(args.only.split(","))
  unknown = only - set(SECTIONS)
  if unknown:
    parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
  peer = None if args.no_peer or not os.path.exists(args.peer_python) else args.peer_python
  it = str(args.iters)
  dev = ["--devices", str(args.devices)] if args.devices > 1 else []
  r: dict = {}
  if "ceilings" in only:
    r["ceilings"] = run_json(py("ceilings.py"), 600)
  if "sampler" in only:
    peer_args = ["--peer_python", peer] if peer else ["--no_peer"]
    r["sampler_dense"] = run_json(py("sampler.py", "--iters", it, *dev, *peer_args), 1200)
    r["sampler_moe"] = run_json(py("sampler.py", "--moe", "--iters", it, *dev, *peer_args), 1200)
  if "grpo" in only:
    for kind, extra in (("dense", []), ("moe", ["--moe"])):
      r[f"grpo_{kind}"] = run_json(py("grpo_step.py", "--iters", it, *dev, *extra), 1800)
      if peer:
        r[f"grpo_{kind}_peer"] = run_json([peer, os.path.join(HERE, "peer_tunix_grpo.py"), "--iters", it, *extra],
                                          3600, env=dict(JAX_PLATFORMS="cpu"))
  if "train" in only:
    r["train_dense"] = run_json(py("train_step.py", "--iters", it), 1200)
    r["train_moe"] = run_json(py("train_step.py", "--moe", "--iters", it), 1200)
  if "moe" in only:
    r["moe_flops"] = run_json(py("moe.py"), 1200)
  if "kernels" in only:
    r["kernels"] = run_json(py("kernels.py", "--iters", it), 1200)
  summary = summarise(r)
  print_table(r, summary)
  print(json.dumps(dict(bench="suite", summary=summary, **r)))


def _get(r, name, *keys):
  x = r.get(name) or {}
  for k in keys:
    if not isinstance(x, dict) or k not in x:
      return None
    x = x[k]
  return x


def summarise(r: dict) -> dict:
  s = {}
  for kind in ("dense", "moe"):
    s[f"sampler_{kind}_tokens_per_s"] = _get(r, f"sampler_{kind}", "tokens_per_s")
    s[f"sampler_{kind}_vs_peer"] = _get(r, f"sampler_{kind}", "ratio")
    s[f"sampler_{kind}_slot_utilisation"] = _get(r, f"sampler_{kind}", "slot_utilisation")
    step, peer_step = _get(r, f"grpo_{kind}", "step_s"), _get(r, f"grpo_{kind}_peer", "median_step_s")
    s[f"grpo_{kind}_step_s"] = step
    s[f"grpo_{kind}_peer_step_s"] = peer_step
    s[f"grpo_{kind}_vs_peer"] = peer_step / step if step and peer_step else None
    s[f"grpo_{kind}_update_mfu"] = _get(r, f"grpo_{kind}", "update_mfu")
    s[f"grpo_{kind}_peak_bytes"] = _get(r, f"grpo_{kind}", "peak_memory_bytes")
    s[f"grpo_{kind}_peer_peak_bytes"] = _get(r, f"grpo_{kind}_peer", "peak_rss_bytes")
    s[f"train_{kind}_mfu"] = _get(r, f"train_{kind}", "mfu")
  s["moe_flop_ratio_max"] = _get(r, "moe_flops", "moe_flop_ratio_max")
  results = _get(r, "kernels", "results") or []
  s["gmm_max_rel_err"] = max((max(x["out_rel_err"], x["dlhs_rel_err"], x["drhs_rel_err"]) for x in results),
                             default=None)
  s["route_kernel_matches"] = _get(r, "kernels", "route_experts_equal")
  s["matmul_flops_per_s"] = _get(r, "ceilings", "matmul_flops_per_s")
  s["copy_bytes_per_s"] = _get(r, "ceilings", "copy_bytes_per_s")
  s["errors"] = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
  return s


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def print_table(r: dict, s: dict) -> None:
  c = r.get("ceilings") or {}
  print()
  print(f"machine: {c.get('device', '?')} ({c.get('backend', '?')}); matmul "
        f"{_fmt(s['matmul_flops_per_s'] and s['matmul_flops_per_s'] / 1e9, '.1f')} GFLOP/s ({c.get('dtype', '?')}), "
        f"copy {_fmt(s['copy_bytes_per_s'] and s['copy_bytes_per_s'] / 1e9, '.1f')} GB/s")
  print(f"{'figure':44s} {'dense':>14s} {'moe':>14s}")
  rows = [
      ("sampler tokens/s", "sampler_{}_tokens_per_s", ",.0f"),
      ("sampler vs tunix (x)", "sampler_{}_vs_peer", ".2f"),
      ("slot utilisation, heavy-tailed (continuous)", "sampler_{}_slot_utilisation", ".1%"),
      ("GRPO step s (rollout + ref + update)", "grpo_{}_step_s", ".2f"),
      ("tunix GRPO step s", "grpo_{}_peer_step_s", ".2f"),
      ("GRPO step vs tunix (x, > 1 faster)", "grpo_{}_vs_peer", ".2f"),
      ("GRPO update MFU", "grpo_{}_update_mfu", ".1%"),
      ("GRPO peak memory GiB", "grpo_{}_peak_bytes", ".2f"),
      ("tunix GRPO peak RSS GiB", "grpo_{}_peer_peak_bytes", ".2f"),
      ("SFT train-step MFU", "train_{}_mfu", ".1%"),
  ]
  for label, key, spec in rows:
    vals = [s.get(key.format(k)) for k in ("dense", "moe")]
    if "GiB" in label:
      vals = [v / 2 ** 30 if v else None for v in vals]
    print(f"{label:44s} {_fmt(vals[0], spec):>14s} {_fmt(vals[1], spec):>14s}")
  if s["moe_flop_ratio_max"] is not None:
    print(f"{'MoE layer compiled / active FLOPs (worst)':44s} {'':>14s} {s['moe_flop_ratio_max']:>14.3f}")
  if s["gmm_max_rel_err"] is not None:
    print(f"Pallas gmm worst relative error vs ragged_dot: {s['gmm_max_rel_err']:.1e}; routing kernel "
          f"matches: {s['route_kernel_matches']}")
  for name, err in s["errors"].items():
    print(f"FAILED {name}: {err}")


if __name__ == "__main__":
  main()
