"""`--dry_run`: per-device memory of a config on its target mesh, before anything is allocated.

    R1JAX_NUM_DEVICES=1024 R1JAX_DEVICE_MEMORY_GIB=95 \\
      python -m r1jax.train --config configs/r1_zero_deepseek_v3.py --dry_run

The target is given by the environment, as a dry run plans for a machine it is not on:
  R1JAX_NUM_DEVICES       devices of the target (one per TPU chip on v4 / v5p / v5e / v6e,
                          one per GPU). Default: the product of the mesh sizes when none is
                          -1, else the devices of this machine.
  R1JAX_DEVICE_MEMORY_GIB memory per device in GiB (TPU v5p 95, v4 32, v5e 16, v6e 32;
                          H100 80, H200 141; on GPU give what XLA may use, by default 75%).
                          Default: what the local accelerator reports; none on CPU, where
                          the table is printed without a verdict.
A mesh that cannot fit exits with status 2 and one message naming the largest terms.

What is exact and what is estimated (c = bytes of model.dtype; per device throughout):
  parameters   exact: fp32 master weights, every parameter's shape divided by the mesh
               axes its logical axes map to (parallel.TRAIN_RULES, incl. the rule that an
               axis not dividing a dimension leaves it whole).
  gradients    = parameters (fp32, same sharding), alive during the update.
  optimizer    = 2 x parameters (AdamW first and second moments, fp32).
  reference    = parameters when stage grpo and rl.beta > 0 (the frozen fp32 copy).
  The step phases below run one at a time; the peak is the largest phase plus the above.
  update       the jitted train step on r rows per device: r = ceil(rows / W), W =
               data * fsdp * expert, rows = batch_size / train.microbatches (pretrain / sft)
               or batch_size * G / (rl.minibatches * rl.microbatches) (grpo); with
               micro-batches > 1 one more fp32 gradient, the accumulator, is alive.
               Activations kept for the backward pass, by model.remat:
                 none: every tensor the backward pass reads, for all L layers, per token
                 and layer: the residual stream and norms (4 D c), attention projections
                 (MLA: q latents, q, roped q, kv latents, per-head k and v, out; GQA: q, k,
                 v, roped q and k, out; per-head terms / tensor), the FFN (dense: 4 F/tensor
                 c; MoE: fp32 router logits and scores 8 E, top_k token copies and SwiGLU
                 intermediates k (3 D + 4 F_e/tensor) c, shared experts 4 S F_e/tensor c);
                 full: each block's input (D c per token and layer) plus one layer's
                 tensors above while its block reruns;
                 save_dots: as full, plus every projection's output per layer.
               Attention, by model.attention_chunk = q (0: q = T): the boolean mask and the
                 fp32 scores of q queries at a time, H/tensor x q x T x 8 (scores and their
                 gradient), plus the softmax output in fp32 and in c, H/tensor x q x T x
                 (4 + c), kept for all L layers only when neither remat nor query blocks
                 rerun it (the quadratic term at long T).
               logits: fp32 [r, P, V/tensor] logits, log-softmax and gradient, P = T + 3 N
               positions (grpo: the completion slice scaled by the temperature, its
               log-softmax and the entropy's) or 3 T; with model.logits_chunk = n, one
               block's: P = 3 n.
               With fsdp > 1, weights are all-gathered per use: 2 x the largest layer (or
               embedding) in fp32 without its fsdp split (one in use, one prefetched).
  rollout      (grpo) the sampler's cache for ceil(B' G / W) rows of seq_len slots, L layers:
               MLA keeps the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim) c a
               slot, GQA 2 K Dh c (/ tensor); the prefill of ceil(B' / W) prompts (one layer's
               scores, q queries at a time; the last prompt token's fp32 logits); the
               routing-replay record of chosen experts (int32, L_moe x rows x seq_len x
               top_k). B' = ceil(rl.oversample x B) with dynamic sampling. The stage's
               sampler splits the rows over the batch axes itself (parallel.rollout_mesh)
               and, with fsdp > 1, holds a copy of the weights without the fsdp split
               (routed experts still split over expert, everything still split over
               tensor).
               Continuous batching (rl.slots = S) holds ceil(S / W) rows a device (S
               when the rows do not split) plus a store of prefilled prompts, and every
               device holds every routed expert.
  reference forward (grpo, beta > 0) in passes of the update's r rows: one layer's attention
               (q queries at a time), logits (2 n positions with logits_chunk), and the
               whole batch (tokens, masks, expert record) on device.
Not counted: XLA's temporary buffers beyond the working sets above, fragmentation, the
eval sampler (eval.n x eval.k rows), host memory. The total is a lower bound: XLA:CPU's
own accounting of the compiled train step of small GQA and MLA + MoE models came out
1.2x-1.5x above it (tests/test_memory.py keeps it within 2x). So a refusal is certain
("even the lower bound does not fit"), a fit is not: check a real step with the compiled
memory_analysis() on the target before a long run.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from r1jax import config as config_lib
from r1jax import parallel
from r1jax.model.transformer import Transformer
from r1jax.sampling import continuous

GIB = 1024 ** 3
NUM_DEVICES_ENV = "R1JAX_NUM_DEVICES"
DEVICE_MEMORY_ENV = "R1JAX_DEVICE_MEMORY_GIB"


class Misfit(ValueError):
  """The config cannot run on the target mesh; the message says why."""


def _params(config):
  """The model's nnx.Param state as abstract shapes (nothing allocated)."""
  model = nnx.eval_shape(lambda: Transformer(config_lib.model_config(config), nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def _shards(params, mesh_shape):
  """[(path keys, global shape, per-device shape)] of every parameter, placed exactly as
  parallel.state_shardings places it, on an abstract mesh of `mesh_shape` (no devices)."""
  mesh = AbstractMesh(tuple(mesh_shape), parallel.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(parallel.MESH_AXES))
  is_var = lambda x: isinstance(x, nnx.Variable)
  flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_var)
  shardings = jax.tree.leaves(parallel.state_shardings(params, mesh),
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  out = []
  for (path, var), sharding in zip(flat, shardings, strict=True):
    keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    shape = tuple(var.get_value().shape)
    out.append((keys, shape, sharding.shard_shape(shape)))
  return out


def per_device_param_bytes(config, mesh_shape, params=None) -> tuple[int, float]:
  """(total parameter count, fp32 bytes per device under the train rules)."""
  shards = _shards(_params(config) if params is None else params, mesh_shape)
  total = sum(math.prod(shape) for _, shape, _ in shards)
  return total, float(sum(4 * math.prod(local) for _, _, local in shards))


def gathered_weight_bytes(params, mesh_shape) -> float:
  """2 x fp32 bytes of the largest unit all-gathered over fsdp for use: one decoder layer
  (or one parameter outside the layers, e.g. the embedding), split by every axis but fsdp."""
  sizes = dict(zip(parallel.MESH_AXES, mesh_shape))
  if sizes["fsdp"] == 1:
    return 0.0
  units: dict = {}
  for keys, _, local in _shards(params, tuple(1 if a == "fsdp" else n for a, n in sizes.items())):
    unit = keys[:2] if keys[0] in ("layers", "mtp") else keys
    units[unit] = units.get(unit, 0.0) + 4 * math.prod(local)
  return 2 * max(units.values())


def _per_tensor(n: int, tensor: int) -> float:
  """A per-head / per-feature dimension's share of one device: split over the tensor axis
  when it divides (parallel.TRAIN_RULES leaves it whole otherwise)."""
  return n / tensor if n % tensor == 0 else n


def _per_token_layer_bytes(cfg, tensor: int, moe: bool, c: int) -> float:
  """Activation bytes one token keeps for the backward pass in one layer (see the docstring)."""
  split = lambda n: _per_tensor(n, tensor)  # pylint: disable=unnecessary-lambda-assignment
  d = cfg.d_model
  total = 4 * d * c + d * c  # residual in, attn norm, residual mid, ffn norm; o-projection out
  if cfg.attention == "mla":
    h = split(cfg.n_heads)
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    total += 2 * cfg.q_lora_rank * c + 2 * h * (dn + dr) * c  # q latents; q and roped q
    total += (r + dr) * c + (r + dr) * c  # kv latents, normalised latent + roped key
    total += h * (dn + 2 * dv) * c  # per-head keys, values, attention output
  else:
    h, kv = split(cfg.n_heads), split(cfg.n_kv_heads)
    dh = cfg.head_dim
    total += 2 * h * dh * c + 3 * kv * dh * c + h * dh * c  # q, roped q; k, v, roped k; out
  if moe:
    fe = split(cfg.moe_d_ff)
    slots = cfg.n_experts if cfg.moe_impl == "dense" else cfg.top_k
    total += 8 * cfg.n_experts  # fp32 router logits and scores
    total += slots * (3 * d + 4 * fe) * c  # token copies, SwiGLU intermediates, expert outputs
    total += 4 * cfg.n_shared_experts * fe * c
  else:
    total += 4 * split(cfg.d_ff) * c
  return total


def _per_token_dot_bytes(cfg, tensor: int, c: int) -> float:
  """Bytes of the matmul outputs one token keeps per layer under remat "save_dots"
  (projections; the attention matmuls have batch dimensions and are not saved)."""
  split = lambda n: _per_tensor(n, tensor)  # pylint: disable=unnecessary-lambda-assignment
  d = cfg.d_model
  if cfg.attention == "mla":
    h = split(cfg.n_heads)
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    attn = cfg.q_lora_rank + h * (dn + dr) + (r + dr) + h * (dn + 2 * dv) + d
  else:
    attn = (split(cfg.n_heads) * 2 + split(cfg.n_kv_heads) * 2) * cfg.head_dim + d  # q, k, v, out, o-proj
  if cfg.is_moe:  # the widest layer kind counts: routed experts' SwiGLU on top_k copies
    ffn = 4 * cfg.n_experts / c + cfg.top_k * (2 * split(cfg.moe_d_ff) + d) + cfg.n_shared_experts * (
        2 * split(cfg.moe_d_ff) + d)
  else:
    ffn = 2 * split(cfg.d_ff) + d
  return (attn + ffn) * c


def kv_slot_bytes(cfg, tensor: int = 1) -> float:
  """Sampler cache bytes of one position in one layer, per device: MLA keeps the latent
  and the RoPE key, GQA K and V (the KV heads split over `tensor` when it divides them)."""
  c = 2 if cfg.dtype == "bfloat16" else 4
  if cfg.attention == "mla":
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * c
  kv = _per_tensor(cfg.n_kv_heads, tensor)
  return 2 * kv * cfg.head_dim * c


def estimate(config, mesh_shape, params=None) -> dict:
  """Per-device bytes of every term (see the module docstring): an ordered dict of rows
  `name -> bytes` plus `phases` (name -> bytes) and `notes`."""
  cfg = config_lib.model_config(config)
  params = _params(config) if params is None else params
  sizes = dict(zip(parallel.MESH_AXES, mesh_shape))
  tensor = sizes["tensor"]
  ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  c = 2 if cfg.dtype == "bfloat16" else 4
  grpo = config.stage == "grpo" or (config.stage == "pipeline" and "grpo" in config.stages)
  rl, t = config.rl, config.train
  seq = t.seq_len
  heads, vocab = _per_tensor(cfg.n_heads, tensor), _per_tensor(cfg.vocab_size, tensor)
  n_layers = cfg.n_layers + cfg.mtp_depth
  moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers))

  total_params, p = per_device_param_bytes(config, mesh_shape, params)
  rows = {"parameters (fp32)": p, "gradients (fp32)": p, "optimizer (AdamW m, v; fp32)": 2 * p}
  reference = p if grpo and rl.beta > 0 else 0.0
  if reference:
    rows["reference policy (fp32)"] = reference
  persistent = 3 * p + reference  # parameters, moments, reference; gradients: update phase

  gathered = gathered_weight_bytes(params, mesh_shape)
  micro = max(rl.microbatches if grpo else t.microbatches, 1)
  passes = max(rl.minibatches, 1) * micro if grpo else micro
  update_rows = t.batch_size * (rl.group_size if grpo else 1) // passes
  accumulator = p if micro > 1 else 0.0
  r = math.ceil(update_rows / ways)
  layer_bytes = [_per_token_layer_bytes(cfg, tensor, cfg.layer_is_moe(i), c) for i in range(cfg.n_layers)]
  layer_bytes += [_per_token_layer_bytes(cfg, tensor, cfg.is_moe, c)] * cfg.mtp_depth
  q_rows = min(cfg.attention_chunk or seq, seq)  # queries whose scores exist at once
  scores = heads * q_rows * seq  # one layer's fp32 scores (per row)
  if cfg.remat == "none":
    activations = r * seq * sum(layer_bytes)
  else:  # each block's input, (save_dots) its projections, and one block rerun at a time
    kept = cfg.d_model * c + (_per_token_dot_bytes(cfg, tensor, c) if cfg.remat == "save_dots" else 0)
    activations = r * seq * (n_layers * kept + max(layer_bytes))
  # Kept for the backward pass: every layer's softmax (fp32 and c) unless remat or query
  # blocks rerun it; plus one layer's working set (fp32 scores and their gradient) and
  # the boolean mask of the queries in flight.
  kept_layers = n_layers if cfg.remat == "none" and q_rows == seq else 1
  attention = r * (kept_layers * scores * (4 + c) + q_rows * seq + scores * 8)
  logit_positions = seq + 3 * rl.max_new_tokens if grpo else 3 * seq
  if cfg.logits_chunk:  # one block's logits, log-softmax and gradient
    logit_positions = min(logit_positions, 3 * cfg.logits_chunk)
  logits = r * logit_positions * vocab * 4
  phases = {"update": p + accumulator + activations + attention + logits + gathered}
  remat = "no remat" if cfg.remat == "none" else f"remat {cfg.remat}"
  rows[f"update: activations ({remat})"] = activations
  rows["update: attention scores (" + ("dense" if q_rows == seq else f"blocks of {q_rows}") + ")"] = attention
  rows["update: logits (fp32, " + (f"blocks of {cfg.logits_chunk})" if cfg.logits_chunk else "unchunked)")] = logits
  if accumulator:
    rows[f"update: gradient accumulator ({micro} passes, fp32)"] = accumulator
  if gathered:
    rows["fsdp-gathered weights"] = gathered
  notes = [f"update: {r} row(s) of {seq} tokens per device ({update_rows} rows over {ways} batch shards)"]
  if passes > 1 and update_rows < ways:  # a pass's rows spread over the shards (microbatch.spread_rows)
    knob = "rl.minibatches x rl.microbatches" if grpo else "train.microbatches"
    notes.append(f"update: a pass holds {update_rows} row(s) for {ways} batch shards, so some devices idle in "
                 f"every pass; fewer {knob} keeps them busy")

  if grpo:
    sampled = math.ceil(rl.oversample * t.batch_size) if rl.dynamic_sampling else t.batch_size
    split = parallel.rollouts_split(sizes, sampled)
    r_roll = math.ceil(sampled * rl.group_size / ways)
    r_prompt = math.ceil(sampled / ways)
    r_cache = r_roll
    if rl.slots:  # continuous batching: S / W slots a device (S without the split) + the prompt store
      r_cache = continuous.slots_per_shard(rl.slots, ways) if split else rl.slots
      r_prompt = continuous.prompts_per_prefill(r_cache, rl.group_size, sampled)
      r_cache += r_prompt
    prompt = seq - rl.max_new_tokens
    cache = r_cache * seq * (cfg.n_layers * kv_slot_bytes(cfg, tensor) + 1)
    prefill = r_prompt * (heads * min(q_rows, prompt) * prompt * (8 + c) + vocab * 4)
    replay = moe_layers * r_roll * seq * cfg.top_k * 4 if rl.routing_replay else 0
    rows["rollout: KV cache"] = cache
    rows["rollout: prefill + expert record"] = prefill + replay
    rollout_weights = gathered
    # Axes the rollout's weights are not split over (parallel.rollout_mesh splits the rows
    # instead): fsdp; with continuous batching also expert, whose devices then hold every expert.
    whole_over = ("fsdp", "expert") if rl.slots else ("fsdp",)
    if split and any(sizes[a] > 1 for a in whole_over):
      _, rollout_weights = per_device_param_bytes(
          config, tuple(1 if a in whole_over else n for a, n in sizes.items()), params)
      rows["rollout: weights whole (no " + " / ".join(a for a in whole_over if sizes[a] > 1) + " split)"] = (
          rollout_weights)
    phases["rollout"] = cache + prefill + replay + rollout_weights
    notes.append(f"rollout: {r_cache} cache row(s) of {seq} slots per device" + (
        f" ({rl.slots} continuous-batching slots{' over ' + str(ways) + ' batch shards' if split else ''}"
        f" + a {r_prompt}-prompt store)" if rl.slots else ""))
    r_all = math.ceil(t.batch_size * rl.group_size / ways)
    batch = r_all * seq * (5 * 4 + moe_layers * cfg.top_k * 4)
    phases["update"] += batch
    if rl.beta > 0:
      ref_positions = seq + 2 * rl.max_new_tokens
      if cfg.logits_chunk:
        ref_positions = min(ref_positions, 2 * cfg.logits_chunk)
      # In passes of the update's rows (trainer.make_reference_logprobs).
      ref_fwd = r * (scores * (8 + c) + ref_positions * vocab * 4)
      rows["reference forward" + (f" ({passes} passes of {r} row(s))" if passes > 1 else " (all rows)")] = ref_fwd
      phases["reference forward"] = ref_fwd + batch + gathered
  peak_phase = max(phases, key=phases.get)
  return dict(rows=rows, persistent=persistent, phases=phases, peak_phase=peak_phase,
              total=persistent + phases[peak_phase], total_params=total_params, notes=notes)


def target(config, n_devices=None, device_memory_gib=None):
  """(mesh shape, device memory in bytes or None, where the memory figure came from)."""
  axes = [int(config.mesh[a]) for a in parallel.MESH_AXES]
  if n_devices is None and os.environ.get(NUM_DEVICES_ENV):
    n_devices = _positive(NUM_DEVICES_ENV, os.environ[NUM_DEVICES_ENV], int)
  if n_devices is None:
    n_devices = int(np.prod(axes)) if -1 not in axes else jax.device_count()
  try:
    shape = parallel.mesh_shape(config.mesh, n_devices)
  except ValueError as e:
    raise Misfit(f"{e}. For a dry run, set {NUM_DEVICES_ENV} to the target's device count "
                 f"(e.g. {NUM_DEVICES_ENV}=1024 for a v5p-2048, which has 1,024 chips)") from None
  source = f"{DEVICE_MEMORY_ENV}"
  if device_memory_gib is None and os.environ.get(DEVICE_MEMORY_ENV):
    device_memory_gib = _positive(DEVICE_MEMORY_ENV, os.environ[DEVICE_MEMORY_ENV], float)
  if device_memory_gib is None:
    device_memory_gib, source = _local_device_memory_gib(), "reported by the local device"
  memory = None if device_memory_gib is None else device_memory_gib * GIB
  return shape, memory, source


def _positive(name, raw, kind):
  try:
    value = kind(raw)
  except ValueError:
    value = -1
  if value <= 0:
    raise Misfit(f"{name}={raw!r} must be a positive {'integer' if kind is int else 'number'}")
  return value


def _local_device_memory_gib():
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  return limit / GIB if limit else None


def check(config, est: dict, mesh_shape, memory) -> None:
  """Raises one Misfit naming every reason the config cannot run on `mesh_shape`: a batch
  that cannot be split over the batch shards, or an estimate above `memory`."""
  sizes = dict(zip(parallel.MESH_AXES, mesh_shape))
  ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  grpo = config.stage == "grpo" or (config.stage == "pipeline" and "grpo" in config.stages)
  rows = config.train.batch_size * (config.rl.group_size if grpo else 1)
  what = "train.batch_size x rl.group_size" if grpo else "train.batch_size"
  problems = []
  if rows % ways:
    problems.append(f"{what} = {rows} rows cannot be split evenly over data x fsdp x expert = "
                    f"{ways} batch shards (make it a multiple of {ways}, or move devices to "
                    f"mesh.tensor)")
  if memory is not None and est["total"] > memory:
    big = sorted(est["rows"].items(), key=lambda kv: -kv[1])[:2]
    terms = " and ".join(f"{name} {value / GIB:,.1f} GiB" for name, value in big)
    problems.append(f"it needs ~{est['total'] / GIB:,.1f} GiB per device, more than the "
                    f"{memory / GIB:,.1f} GiB available (largest: {terms})")
  if problems:
    raise Misfit(f"mesh {parallel.mesh_text(mesh_shape)} cannot run this config: " + "; and ".join(problems))


def report(config, n_devices: int | None = None, device_memory_gib: float | None = None) -> int:
  """Prints the per-device table; 0 if it fits (or memory is unknown), 2 with one message
  on stderr if it cannot."""
  try:
    mesh_shape, memory, source = target(config, n_devices, device_memory_gib)
    est = estimate(config, mesh_shape)
  except Misfit as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = int(np.prod(mesh_shape))
  print(f"model: {est['total_params'] / 1e9:.2f}B parameters; stage {config.stage}; "
        f"mesh {parallel.mesh_text(mesh_shape)} ({n} devices)")
  for note in est["notes"]:
    print(note)
  print(f"{'per device':<42} {'GiB':>12}")
  for name, value in est["rows"].items():
    print(f"{name:<42} {value / GIB:>12,.2f}")
  print(f"{'peak (' + est['peak_phase'] + ' phase)':<42} {est['total'] / GIB:>12,.2f}")
  try:
    check(config, est, mesh_shape, memory)
  except Misfit as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if memory is None:
    print(f"device memory unknown: set {DEVICE_MEMORY_ENV} (GiB per device) to check the fit")
  else:
    print(f"fits: {est['total'] / memory:.0%} of {memory / GIB:,.1f} GiB per device ({source}); "
          f"estimates are lower bounds, see r1jax/memory.py")
  return 0
