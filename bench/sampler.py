"""Sampler throughput and slot utilisation, side by side with a peer (tunix's sampler).

  python bench/sampler.py [--moe] [--iters 5] [--devices 1 [--mesh_axis expert|data]] [--slots 16]
                          [--peer_python /work/peer_venv/bin/python | --no_peer]

Workload (issue 4): vocab 512, d_model 256, 4 layers, 4 heads / 2 KV heads, head_dim 64,
MLP 512, fp32, random weights; 8 prompts x G = 8 samples, prompt length 32, 128 new
tokens, temperature 1.0, an EOS that is never drawn, so every row generates all 128
tokens. --moe makes every layer 8 experts top-2 (softmax router, no shared expert). The
model is Qwen3-shaped (q/k RMSNorm) because the peer's model with an MoE variant is
tunix's Qwen3; both sides run the same architecture and the same FLOPs.

tokens/s counts only generated tokens (mask.sum()), over the median of --iters timed
calls after one untimed warm-up call (compilation excluded), prefill included.

Slot utilisation = useful tokens / (decode rows x decode iterations), summed over the
iterations. It is measured on a heavy-tailed mix of the same prompts: each row's length
is drawn log-normal (median N/8, sigma 1, capped at N = 8 x median) through
`max_tokens_per_row`, plain batching vs continuous batching over --slots rows.
Continuous batching halves its rows once nothing is waiting and half are idle, so its
decode rows shrink in the tail; the last column divides by --slots x iterations instead.
With --devices N, plain batching splits the prompts over the N devices; continuous
batching runs on one device (the `slot_utilisation` figure) and then on the mesh (a
batcher on each device with --slots / N slots over its own share of the prompts).

The peer runs in its own venv as a subprocess (bench/peer_tunix.py --serve), warmed up
before our timed calls; each of our timed calls is followed by one of the peer's, so load
from other processes on a shared machine hits both alike. ratio = our tokens/s / the
peer's (medians); pair_ratio = the median over back-to-back pairs; the cpu-s column is
process CPU time per call (both sides single-process), a second view that is less
sensitive to other load than wall time.

--devices N (N > 1) makes XLA treat the CPU as N devices and runs plain batching on a
mesh of one axis (`generate(mesh=...)`, prompts split over the devices): how our sampler
uses more than one core. --mesh_axis names that axis: "data" holds every expert on every
device; "expert" (the default with --moe) also splits the routed experts over the
devices (expert-parallel decode, r1jax/model/cached_moe.py). The default, 1, is one
device like the peer. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# XLA reads the device count when JAX starts: --devices must be applied before the import.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import cpu_devices  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  cpu_devices.set_from_argv()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position

from r1jax.model.config import ModelConfig  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.model.transformer import Transformer  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.rl import grpo  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.sampling import continuous  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.sampling.sampler import (  # noqa: E402  pylint: disable=wrong-import-position
    SamplingParams, generate, slot_utilisation)

DEFAULT_PEER = "/work/peer_venv/bin/python"


def model_config(moe: bool) -> ModelConfig:
  moe_kw = dict(n_experts=8, top_k=2, moe_d_ff=512, router="softmax", norm_topk_prob=True) if moe else {}
  return ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                     d_ff=512, qk_norm=True, dtype="float32", **moe_kw)


def heavy_tailed_lengths(n_rows: int, n: int, seed: int):
  """Log-normal lengths with median n/8, capped at n (8 x the median)."""
  rng = np.random.default_rng(seed)
  median = n / 8
  return np.clip(np.round(median * np.exp(rng.standard_normal(n_rows))), 1, n).astype(np.int32)


class Peer:
  """bench/peer_tunix.py --serve in the peer venv: warmed up once, then one timed call
  per `run()`, so its calls interleave with ours."""

  def __init__(self, args):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_tunix.py")
    cmd = [args.peer_python, script, "--serve", "--prompts", str(args.prompts), "--group", str(args.group),
           "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    self.proc = subprocess.Popen(cmd + (["--moe"] if args.moe else []), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self):
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"peer exited (rc {self.proc.wait()})")
      if line.startswith("{"):
        return json.loads(line)

  def run(self):
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def start_peer(args):
  if args.no_peer or not os.path.exists(args.peer_python):
    return None
  try:
    return Peer(args)
  except (OSError, RuntimeError) as err:
    print(f"peer unavailable: {err}", file=sys.stderr)
    return None


def timed(fn, iters: int, peer=None):
  """Times `iters` calls of fn(i) after one untimed warm-up call; with a peer, each of
  our calls is followed by one of the peer's. Returns (our wall seconds, our CPU
  seconds, peer records, the last result)."""
  jax.block_until_ready(fn(0))
  ours, cpu, theirs, out = [], [], [], None
  for i in range(iters):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(i + 1))
    ours.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    if peer is not None:
      theirs.append(peer.run())
  return ours, cpu, theirs, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--moe", action="store_true")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--slots", type=int, default=16, help="continuous-batching rows for the heavy-tailed mix")
  ap.add_argument("--cache_segments", type=int, default=grpo.default_rl_config().cache_segments,
                  help="plain batching: decode segments over a growing cache (default: the trainer's)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--devices", type=int, default=1, help="CPU devices for data-parallel rollouts")
  ap.add_argument("--mesh_axis", choices=("data", "expert"), default=None,
                  help="with --devices > 1: the mesh axis (default: expert with --moe, else data)")
  ap.add_argument("--peer_python", default=DEFAULT_PEER)
  ap.add_argument("--no_peer", action="store_true")
  args = ap.parse_args()

  cfg = model_config(args.moe)
  model = Transformer(cfg, nnx.Rngs(args.seed))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(args.seed)
  ids = rng.integers(1, cfg.vocab_size, size=(args.prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  n_rows = args.prompts * args.group
  # EOS = an id past the vocabulary: never drawn, every row runs all N tokens.
  params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(cfg.vocab_size,),
                          cache_segments=args.cache_segments)

  mesh = None
  if args.devices > 1:
    assert len(jax.devices()) == args.devices, jax.devices()
    axis = args.mesh_axis or ("expert" if args.moe else "data")
    mesh = jax.make_mesh((args.devices,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))

  def sample(i, **kw):
    kw.setdefault("mesh", mesh)
    return generate(graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(i),
                    group_size=args.group, params=params, **kw)

  peer = start_peer(args)  # compiles before any of our timed calls
  times, cpu_times, peer_runs, out = timed(sample, args.iters, peer)
  if peer is not None:
    peer.close()
  sec, cpu_sec = statistics.median(times), statistics.median(cpu_times)
  tokens = int(np.asarray(out["mask"]).sum())
  ours_tps = tokens / sec
  peer_tps = None
  if peer_runs:
    peer_tokens = peer_runs[0]["tokens"]
    peer_tps = peer_tokens / statistics.median(r["seconds"] for r in peer_runs)
    peer_cpu = statistics.median(r["cpu_seconds"] for r in peer_runs)
    # Each (ours, peer) pair ran back to back: the median of pair ratios is the least
    # sensitive to load that changes during the run.
    pair_ratio = statistics.median((tokens / a) / (peer_tokens / r["seconds"]) for a, r in zip(times, peer_runs))

  lengths = heavy_tailed_lengths(n_rows, args.new_tokens, args.seed)
  mix = {}
  cont_name = f"continuous ({args.slots} slots)"
  runs = [("plain", dict(mesh=mesh)), (cont_name, dict(slots=args.slots, mesh=None))]
  if mesh is not None:  # a batcher on each device, --slots / N slots each
    runs.append((f"continuous ({args.slots} slots, {args.devices} dev)", dict(slots=args.slots, mesh=mesh)))
  for name, kw in runs:
    ts, _, _, o = timed(lambda i, kw=kw: sample(i, max_tokens_per_row=lengths, **kw), args.iters)
    useful = int(np.asarray(o["mask"]).sum())
    assert useful == int(lengths.sum()), (useful, int(lengths.sum()))
    s = statistics.median(ts)
    rows = args.slots if "slots" in kw else n_rows
    mix[name] = dict(utilisation=slot_utilisation(o), tokens_per_s=useful / s, seconds=s,
                     steps=int(o["steps"]), slot_steps=int(o["slot_steps"]),
                     utilisation_fixed_rows=useful / (rows * int(o["steps"])))

  kind = "moe (8 experts top-2)" if args.moe else "dense"
  on_mesh = ""
  if mesh is not None:
    on_mesh = (f" on a {mesh.axis_names[0]} axis (continuous batching: one device, then "
               f"{continuous.slots_per_shard(args.slots, args.devices)} slots on each device)")
  print(f"workload: {kind}, {args.prompts} prompts x G={args.group}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, T=1.0, fp32, jax {jax.__version__}, {jax.devices()[0].platform} x "
        f"{args.devices} device(s){on_mesh}")
  print(f"{'':32s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'ratio':>6s} {'cpu-s':>6s}")
  print(f"{'r1jax generate':32s} {tokens:7d} {sec:8.3f} {ours_tps:9,.0f} "
        f"{(ours_tps / peer_tps) if peer_tps else float('nan'):6.2f} {cpu_sec:6.2f}")
  if peer_tps:
    print(f"{'tunix 0.1.7 Sampler (peer)':32s} {peer_tokens:7d} {peer_tokens / peer_tps:8.3f} "
          f"{peer_tps:9,.0f} {1.0:6.2f} {peer_cpu:6.2f}")
    print(f"median ratio of back-to-back pairs: {pair_ratio:.2f}; CPU-time ratio: {peer_cpu / cpu_sec:.2f} "
          f"(process CPU seconds per call, both sides: less sensitive to other load)")
  print(f"heavy-tailed mix: {int(lengths.sum())} tokens, lengths median {np.median(lengths):.0f}, "
        f"max {lengths.max()}")
  print(f"{'':32s} {'utilisation':>11s} {'steps':>6s} {'slot-steps':>10s} {'tokens/s':>9s} "
        f"{'util. if rows never shrank':>26s}")
  for name, m in mix.items():
    print(f"{name:32s} {m['utilisation']:11.1%} {m['steps']:6d} {m['slot_steps']:10d} {m['tokens_per_s']:9,.0f} "
          f"{m['utilisation_fixed_rows']:26.1%}")
  cont = mix[cont_name]  # one device: the figure the sampler issue's target reads
  result = dict(workload=kind, devices=args.devices, mesh_axis=mesh.axis_names[0] if mesh is not None else None,
                tokens=tokens, seconds=times, cpu_seconds=cpu_times,
                tokens_per_s=ours_tps,
                slot_utilisation=cont["utilisation"], slot_utilisation_plain=mix["plain"]["utilisation"],
                heavy_tailed=mix, slots=args.slots)
  if peer_tps:
    result.update(peer="google-tunix 0.1.7 vanilla sampler", peer_tokens_per_s=peer_tps,
                  peer_seconds=[r["seconds"] for r in peer_runs], ratio=ours_tps / peer_tps,
                  pair_ratio=pair_ratio, peer_cpu_seconds=[r["cpu_seconds"] for r in peer_runs],
                  cpu_ratio=peer_cpu / cpu_sec)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
