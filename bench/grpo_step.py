"""One GRPO step, split into its phases: rollout, reference log-probs, policy update.

  python bench/grpo_step.py [--size cpu|gpu] [--moe] [--iters 3] [--devices N]

The step is the trainer's own pieces (r1jax/rl/trainer.py): `generate` for the G
samples of each prompt (with the sampler's log-probs as pi_old), the reference model's
forward (beta = 0.04, so a frozen reference copy is kept and run), and the jitted
`make_update` (GRPO loss, AdamW, non-finite guard), buffers donated. Rewards are random
normals per completion (the model is random; verifiers are benchmarked elsewhere), so
advantages are non-zero and the update is a real one. Every row decodes all N tokens
(EOS never drawn).

Sizes: "cpu" is the sampler issue's workload (8 prompts x G = 8, prompt 32, 128 new
tokens; vocab 512, d_model 256, 4 layers, 4 / 2 heads, head_dim 64, MLP 512, fp32;
--moe: 8 experts top-2); "gpu" is bench/train_step.py's ~1.1B model in bf16 compute,
16 prompts x G = 8, prompt 256, 512 new tokens. Reported: seconds per phase (median of
--iters steps after one warm-up step), tokens/s (generated tokens / step time), update
and reference-forward MFU (model FLOPs of the positions the step runs, 3x and 1x forward,
r1jax/flops.grpo_forward_flops: each group's prompt once with rl.shared_prefix) against
the matmul ceiling measured in the same run, and peak memory (peak RSS on CPU; the
update's compiled memory analysis on accelerators). The last line printed is one JSON
object.

--devices N (CPU, N > 1) makes XLA treat the CPU as N devices and runs the step
data-parallel on a (data = N) mesh, as the trainer would: rollouts split by prompt,
the reference forward and the update split by row (gradients all-reduced). That is how
r1jax uses several cores in one process; the default, 1, is one device like the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import cpu_devices  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  cpu_devices.set_from_argv()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import optax  # noqa: E402  pylint: disable=wrong-import-position

from bench import ceilings  # noqa: E402  pylint: disable=wrong-import-position
from bench.train_step import model_config, peak_memory_bytes  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import flops, parallel  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import state as state_lib  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.rl import grpo  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.rl.trainer import make_reference_logprobs, make_update, sequence_batch, shared_prefix_group  # noqa: E402  pylint: disable=wrong-import-position
from r1jax.sampling.sampler import SamplingParams, generate  # noqa: E402  pylint: disable=wrong-import-position

# microbatches: gradient-accumulation passes per optimizer step (rl.microbatches); on CPU
# 4 passes of 16 rows run the update ~1.4x faster than one of 64 (bench/NOTES.md, session 10).
WORKLOADS = {"cpu": dict(prompts=8, group=8, prompt_len=32, new_tokens=128, minibatches=1, microbatches=4),
             # 128 rows x 768 tokens in one update would hold ~200 GiB of logits and
             # attention; 8 minibatches of 16 rows fit an H200 (one optimizer step each).
             "gpu": dict(prompts=16, group=8, prompt_len=256, new_tokens=512, minibatches=8, microbatches=1)}


def rl_config(new_tokens: int, group: int, minibatches: int, microbatches: int = 1):
  rl = grpo.default_rl_config()
  rl.update(beta=0.04, group_size=group, max_new_tokens=new_tokens, mu=1, minibatches=minibatches,
            microbatches=microbatches)
  return rl


def setup(size: str, moe: bool, moe_impl: str | None = None, mesh=None, microbatches: int | None = None) -> dict:
  """The step's pieces: model config, workload, RL config, optimizer, state and a frozen
  reference copy, prompts, sampling params, and the unjitted update / reference
  functions (shared with bench/profile_ops.py)."""
  cfg = model_config(size, moe, moe_impl)
  w = dict(WORKLOADS[size], **({"microbatches": microbatches} if microbatches else {}))
  rl = rl_config(w["new_tokens"], w["group"], w["minibatches"], w["microbatches"])
  tx = optax.adamw(1e-6, weight_decay=0.1)
  graphdef, st = state_lib.create_state(state_lib.create_model(cfg, seed=0, mesh=mesh), tx)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.vocab_size, size=(w["prompts"], w["prompt_len"])).astype(np.int32)
  params = SamplingParams(max_new_tokens=w["new_tokens"], temperature=rl.temperature, eos_ids=(cfg.vocab_size,),
                          cache_segments=rl.cache_segments)  # as the trainer's rollouts

  return dict(cfg=cfg, w=w, rl=rl, tx=tx, graphdef=graphdef, st=st, ref=jax.tree.map(jnp.copy, st.params),
              rng=rng, ids=ids, mask=np.ones_like(ids), params=params,
              update=make_update(graphdef, tx, rl, w["prompt_len"]),
              ref_logp=make_reference_logprobs(graphdef, rl, w["prompt_len"]))


def make_batch(s: dict, out) -> dict:
  """The update's batch from a rollout: sequences, and group advantages of random
  per-completion rewards (the model is random; verifiers are benchmarked elsewhere)."""
  w, rl = s["w"], s["rl"]
  batch = sequence_batch(s["ids"], s["mask"], out, w["group"])
  rewards = s["rng"].normal(size=(w["prompts"], w["group"])).astype(np.float32)
  batch["adv"] = np.asarray(grpo.group_advantages(jnp.asarray(rewards), rl.adv_mode)).reshape(-1)
  return batch


def run(size: str, moe: bool, moe_impl: str | None = None, iters: int = 3, ceiling: dict | None = None,
        microbatches: int | None = None) -> dict:
  # More than one device (CPU --devices N): data-parallel on a (data = N) mesh.
  mesh = (parallel.make_mesh(dict(data=-1, fsdp=1, expert=1, tensor=1)) if jax.device_count() > 1
          else None)
  s = setup(size, moe, moe_impl, mesh, microbatches)
  cfg, w, rl, graphdef, st, ref, ids, mask, params = (
      s[k] for k in ("cfg", "w", "rl", "graphdef", "st", "ref", "ids", "mask", "params"))
  update = jax.jit(s["update"], donate_argnums=0)
  ref_logp = jax.jit(s["ref_logp"])
  compiled_update = None
  phases = []
  for i in range(iters + 1):  # the first step compiles: not timed
    t0 = time.perf_counter()
    out = jax.device_get(generate(graphdef, (st.params, st.other), prompt_ids_bt=ids, prompt_mask_bt=mask,
                                  rng=jax.random.key(i), group_size=w["group"], params=params, mesh=mesh))
    t1 = time.perf_counter()
    batch = make_batch(s, out)
    if mesh is None:
      batch["ref_logp"] = np.asarray(ref_logp(ref, st.other, batch))
      device_batch = jax.device_put(batch)
    else:  # the trainer's way: rows split over the mesh, reference output kept there
      device_batch = parallel.put_global_batch(mesh, batch)
      with jax.set_mesh(mesh):
        device_batch["ref_logp"] = jax.block_until_ready(ref_logp(ref, st.other, device_batch))
    t2 = time.perf_counter()
    if compiled_update is None:  # traced under the mesh, as the trainer does (MoE dispatch per device)
      with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        compiled_update = update.lower(st, device_batch).compile()
    st, metrics = compiled_update(st, device_batch)
    metrics = jax.device_get(metrics)
    t3 = time.perf_counter()
    if i:
      phases.append(dict(rollout=t1 - t0, reference=t2 - t1, update=t3 - t2, total=t3 - t0))
  med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
  rows = w["prompts"] * w["group"]
  generated = int(np.asarray(out["mask"]).sum())
  ceiling = ceiling or ceilings.measure(dtype=cfg.dtype)
  peak = ceiling["matmul_flops_per_s"]
  # The FLOPs the step does: with rl.shared_prefix each group's prompt runs once when each
  # pass (micro-batch) holds whole groups.
  shared = shared_prefix_group(rl, rows // (w["minibatches"] * w["microbatches"])) > 0
  ref_flops = flops.grpo_forward_flops(cfg, w["prompts"], w["group"], w["prompt_len"], w["new_tokens"], shared)
  update_flops = 3 * ref_flops
  return dict(size=size, moe=moe, moe_impl=cfg.moe_impl if moe else None, dtype=cfg.dtype, beta=rl.beta, **w,
              shared_prefix=shared,
              devices=jax.device_count(),
              seconds=med, step_s=med["total"], generated_tokens=generated,
              tokens_per_s=generated / med["total"], rollout_tokens_per_s=generated / med["rollout"],
              update_mfu=update_flops / med["update"] / peak, reference_mfu=ref_flops / med["reference"] / peak,
              matmul_flops_per_s=peak, loss=float(metrics["loss"]) if "loss" in metrics else None,
              peak_memory_bytes=peak_memory_bytes(compiled_update))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="gpu" if jax.default_backend() != "cpu" else "cpu", choices=tuple(WORKLOADS))
  parser.add_argument("--moe", action="store_true")
  parser.add_argument("--moe_impl", default=None)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--devices", type=int, default=1, help="CPU: simulated devices, run data-parallel")
  parser.add_argument("--microbatches", type=int, default=None,
                      help="gradient-accumulation passes per optimizer step (default: the workload's)")
  args = parser.parse_args()
  r = run(args.size, args.moe, args.moe_impl, args.iters, microbatches=args.microbatches)
  s = r["seconds"]
  mem = r["peak_memory_bytes"]
  print(f"grpo step {'moe/' + r['moe_impl'] if r['moe'] else 'dense'} {r['dtype']} {r['devices']} device(s) "
        f"{r['prompts']}x{r['group']} rows in {r['microbatches']} micro-batch(es), "
        f"{r['prompt_len']}+{r['new_tokens']} tokens: {s['total']:.3f} s = rollout {s['rollout']:.3f} + "
        f"reference {s['reference']:.3f} + update {s['update']:.3f}; {r['tokens_per_s']:,.0f} tok/s; "
        f"update MFU {100 * r['update_mfu']:.1f}%, reference MFU {100 * r['reference_mfu']:.1f}%; "
        f"peak {mem / 2**30 if mem else float('nan'):.2f} GiB")
  print(json.dumps(dict(bench="grpo_step", **r)))


if __name__ == "__main__":
  main()
