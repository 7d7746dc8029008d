"""Expert parallelism: shard_map + all_to_all over the `expert` mesh axis.

DeepSeek-V3 (sec. 3.2.2) trains with 64-way expert parallelism: each device holds
E / ep routed experts, tokens travel to the devices that own their experts and back.
Here, per device, inside one `jax.shard_map` (tokens split over the batch axes
data/fsdp/expert, experts over `expert`, the expert FFN width over `tensor`):

  route the local tokens (group-limited top-k, `moe.route_tokens`)
  -> bucket the N_loc*k slots by destination device (expert // E_loc) into a static
     [ep, C] buffer, slots in token order (so the first C of a bucket are kept)
  -> all_to_all over `expert`: bucket p goes to device p
  -> sort the received rows by local expert, grouped FFN (`moe.grouped_ffn`), un-sort
  -> all_to_all back, each slot reads its own row, weight by the gates, sum over k
  -> psum over `tensor` when the FFN width is split there (Megatron-style partial sums).

Capacity C (rows each device sends each device) is static:
  drop-less (capacity_factor = 0, the default, as in DeepSeek-V3): C = N_loc * min(k, E_loc),
    the worst case of every local slot going to one device (a token picks an expert at
    most once, so it sends at most min(k, E_loc) slots to one device). Nothing is ever
    dropped; the price is a receive buffer of ep * C rows, ep * min(k, E_loc) / k times
    the average traffic, all of it carried by the tiled all_to_all and, with the static
    grouped FFNs (blocked, dense), computed on.
  capacity_factor = c > 0: C = ceil(c * N_loc * k / ep) (capped at the drop-less C): c
    times the average per-device traffic. A slot past C in its bucket is dropped: it adds
    0 (its token keeps the other slots and the shared expert), and the count is returned.
`ep_all_to_all = "ragged"` moves only the filled rows with `lax.ragged_all_to_all`
(same buffers and layout, so the same results); XLA:CPU does not implement it, so it is
an accelerator option and "tiled" (which runs everywhere) is the default.

The mesh: `expert_mesh(explicit)` returns the explicit mesh or the one in context at
trace time (`jax.set_mesh`), when its batch axes (data / fsdp / expert) split the
tokens. With expert = 1 the same shard_map runs plain data parallelism: each device
routes, sorts and computes its own tokens with every expert (no exchange). Left to
XLA's partitioner instead, the sort by expert gathered all devices' tokens: a data = 2
MoE GRPO update on CPU took 5.03 s that way and 3.27 s this way (bench/grpo_step.py
--moe --devices 2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from r1jax import parallel
from r1jax.model import moe
from r1jax.model.config import ModelConfig, resolve_moe_impl
from r1jax.model.layers import activation

EXPERT_AXIS = "expert"


def expert_mesh(mesh=None):
  """The mesh to run the routed experts on per device (see the module docstring), or
  None: `mesh` if given, else the mesh set by `jax.set_mesh` (seen while tracing), when
  a batch axis (data / fsdp / expert) is larger than 1."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return None
  sharded = [a for a in parallel.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1]
  return mesh if sharded else None


def capacity(n_local: int, top_k: int, e_local: int, ep: int, capacity_factor: float) -> int:
  """Rows each device sends each device (see the module docstring)."""
  dropless = n_local * min(top_k, e_local)
  if capacity_factor <= 0:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * n_local * top_k / ep)))


def bucket_slots(dest_s, n_buckets: int, cap: int):
  """Static [n_buckets, cap] table of slot ids, each bucket's slots in slot order.

  dest_s [S] in 0..n_buckets (n_buckets: do not send). Returns (slot_pc, filled_pc,
  rank_s, kept_s, dropped): the slot in each cell (filled_pc marks real ones), each
  slot's place in its bucket, whether it fits, and how many sendable slots did not.
  """
  s = dest_s.shape[0]
  order = jnp.argsort(dest_s, stable=True)
  counts = jnp.bincount(dest_s, length=n_buckets + 1).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  col = jnp.arange(cap, dtype=jnp.int32)
  filled_pc = col[None, :] < counts[:n_buckets, None]
  slot_pc = order[jnp.minimum(starts[:n_buckets, None] + col[None, :], s - 1)]
  rank_s = moe.inverse_permutation(order).astype(jnp.int32) - starts[dest_s]
  kept_s = (dest_s < n_buckets) & (rank_s < cap)
  dropped = jnp.maximum(counts[:n_buckets] - cap, 0).sum()
  return slot_pc, filled_pc, rank_s, kept_s, dropped


def _exchange(x_pc, sizes_p, mode: str):
  """Bucket p of [ep, C, ...] to device p over `expert`; returns [ep, C, ...] with row
  block q from device q. sizes_p: filled rows per bucket (used by "ragged" only)."""
  ep, c = x_pc.shape[:2]
  if ep == 1:  # data-parallel only: every slot stays on its device
    return x_pc
  flat = x_pc.reshape(ep * c, *x_pc.shape[2:])
  if mode == "ragged":
    recv_p = lax.all_to_all(sizes_p, EXPERT_AXIS, 0, 0, tiled=True)
    me = lax.axis_index(EXPERT_AXIS)
    offsets = jnp.arange(ep, dtype=jnp.int32) * c
    out = lax.ragged_all_to_all(flat, jnp.zeros_like(flat), offsets, sizes_p.astype(jnp.int32),
                                jnp.full((ep,), me * c, jnp.int32), recv_p.astype(jnp.int32),
                                axis_name=EXPERT_AXIS)
  else:
    out = lax.all_to_all(flat, EXPERT_AXIS, 0, 0, tiled=True)
  return out.reshape(x_pc.shape)


def local_experts(x_md, eid_m, e_local: int, w_gate_edf, w_up_edf, w_down_efd, act, impl):
  """Received rows through their local expert (eid_m = e_local: an empty row, output 0).
  Returns (y_md, rows per local expert [E_loc])."""
  order = jnp.argsort(eid_m, stable=True)
  sizes_e = jnp.bincount(eid_m, length=e_local + 1)[:e_local].astype(jnp.int32)
  y_sorted = moe.grouped_ffn(x_md[order], sizes_e, w_gate_edf, w_up_edf, w_down_efd, act, impl)
  return y_sorted[moe.inverse_permutation(order)], sizes_e


def _per_device(x_nd, logits_ne, valid_n, forced_nk, bias_e, w_gate_edf, w_up_edf, w_down_efd, *,
                cfg: ModelConfig, ep: int, batch_axes, tensor_axis):
  """One device's share (shapes are local: N_loc tokens, E_loc experts, F_loc width)."""
  n, k, d = x_nd.shape[0], cfg.top_k, x_nd.shape[1]
  e_local = w_gate_edf.shape[0]
  weights_nk, experts_nk = moe.route_tokens(cfg, logits_ne, bias_e, forced_nk)
  experts_s = experts_nk.reshape(-1)
  dest_s = jnp.where(jnp.repeat(valid_n, k), experts_s // e_local, ep)  # padding: not sent
  cap = capacity(n, k, e_local, ep, cfg.capacity_factor)
  slot_pc, filled_pc, rank_s, kept_s, dropped = bucket_slots(dest_s, ep, cap)

  x_pcd = jnp.where(filled_pc[..., None], x_nd[slot_pc // k], 0).astype(x_nd.dtype)
  eid_pc = jnp.where(filled_pc, experts_s[slot_pc] % e_local, e_local)  # e_local: empty row
  y_pcd, load_e = _round_trip(x_pcd, eid_pc, filled_pc.sum(-1).astype(jnp.int32), e_local,
                              (w_gate_edf, w_up_edf, w_down_efd), cfg)

  cell_s = jnp.minimum(dest_s, ep - 1) * cap + jnp.clip(rank_s, 0, cap - 1)
  y_skd = jnp.where(kept_s[:, None], y_pcd.reshape(ep * cap, d)[cell_s], 0).reshape(n, k, d)
  y_nd = jnp.einsum("nkd,nk->nd", y_skd, weights_nk.astype(y_skd.dtype))
  if tensor_axis is not None:  # each tensor rank holds a slice of F: partial sums
    y_nd = lax.psum(y_nd, tensor_axis)
  others = tuple(a for a in batch_axes if a != EXPERT_AXIS)
  load_e = lax.psum(load_e, others) if others else load_e
  dropped = lax.psum(dropped, batch_axes) if batch_axes else dropped
  return y_nd, experts_nk, load_e.astype(jnp.float32), dropped


def _round_trip(x_pcd, eid_pc, sizes_p, e_local: int, ws, cfg: ModelConfig):
  """Send bucket p to device p, run the rows through the local experts, send them back.
  Returns (y_pcd aligned with x_pcd, rows each local expert ran [E_loc])."""
  ep, cap, d = x_pcd.shape
  x_recv = _exchange(x_pcd, sizes_p, cfg.ep_all_to_all)
  eid_recv = _exchange(eid_pc, sizes_p, cfg.ep_all_to_all)
  if cfg.ep_all_to_all == "ragged" and ep > 1:  # rows past a sender's count arrive as 0, not "empty"
    recv_p = lax.all_to_all(sizes_p, EXPERT_AXIS, 0, 0, tiled=True)
    eid_recv = jnp.where(jnp.arange(cap)[None, :] < recv_p[:, None], eid_recv, e_local)
  y_md, load_e = local_experts(x_recv.reshape(ep * cap, d), eid_recv.reshape(-1), e_local, *ws,
                                activation(cfg.hidden_act), resolve_moe_impl(cfg.moe_impl))
  recv_sizes_p = (eid_recv < e_local).sum(-1).astype(jnp.int32)
  return _exchange(y_md.reshape(ep, cap, d), recv_sizes_p, cfg.ep_all_to_all), load_e


def _axes(mesh, cfg: ModelConfig, rules):
  """(batch axes, ep, the axis splitting the expert FFN width or None), from the
  logical-axis table; raises when the experts cannot be split over `expert`."""
  batch = parallel.logical_to_spec(("batch",), rules, mesh)[0]
  batch_axes = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
  experts = parallel.logical_to_spec(("experts",), rules, mesh)[0]
  ep = mesh.shape[EXPERT_AXIS]
  if ep > 1 and experts != EXPERT_AXIS:
    raise ValueError(f"expert parallelism needs the logical axis 'experts' on the mesh axis "
                     f"{EXPERT_AXIS!r}; the rules map it to {experts!r}")
  if cfg.n_experts % ep:
    raise ValueError(f"model.n_experts={cfg.n_experts} must be divisible by mesh.expert={ep} "
                     f"for expert parallelism")
  tensor = parallel.logical_to_spec(("expert_mlp",), rules, mesh)[0]
  if tensor is not None and cfg.moe_d_ff % math.prod(mesh.shape[a] for a in _names(tensor)):
    tensor = None  # the width does not split evenly: keep it whole (as parallel._fit does)
  return batch_axes, ep, tensor


def _names(entry):
  return (entry,) if isinstance(entry, str) else tuple(entry)


def moe_expert_parallel(cfg: ModelConfig, mesh, x_nd, logits_ne, bias_e, forced_nk,
                        w_gate_edf, w_up_edf, w_down_efd, rules=parallel.TRAIN_RULES):
  """The routed experts, expert-parallel. Global shapes: x_nd [N, D], logits_ne [N, E]
  fp32, forced_nk [N, k] or None, weights [E, D, F] / [E, F, D].

  Returns (y_nd, experts_nk, stats): stats = load [E] (slots each expert processed, so
  drops are not counted) and dropped (int32 scalar, slots dropped over the whole mesh).
  """
  batch_axes, ep, tensor = _axes(mesh, cfg, rules)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  n = x_nd.shape[0]
  pad = -n % shards  # shard_map needs N divisible by the batch shards: pad, never send
  valid_n = jnp.arange(n + pad) < n
  pad_rows = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
  x_nd, logits_ne = pad_rows(x_nd), pad_rows(logits_ne)
  if forced_nk is not None:
    forced_nk = pad_rows(forced_nk)

  tokens = P(batch_axes or None)
  experts = EXPERT_AXIS if ep > 1 else None  # ep = 1: every device holds every expert
  w_in, w_out = P(experts, None, tensor), P(experts, tensor, None)
  body = functools.partial(_per_device, cfg=cfg, ep=ep, batch_axes=batch_axes, tensor_axis=tensor)
  if forced_nk is None:
    body = functools.partial(_no_forced, body)
    args, forced_spec = (), ()
  else:
    args, forced_spec = (forced_nk,), (tokens,)
  run = jax.shard_map(
      body, mesh=mesh,
      in_specs=(tokens, tokens, tokens, *forced_spec, P(), w_in, w_in, w_out),
      out_specs=(tokens, tokens, P(EXPERT_AXIS), P()),
      # Pallas (interpret mode) cannot be checked for replication inside shard_map.
      check_vma=resolve_moe_impl(cfg.moe_impl) != "pallas")
  y_nd, experts_nk, load_e, dropped = run(x_nd, logits_ne, valid_n, *args, bias_e,
                                          w_gate_edf, w_up_edf, w_down_efd)
  return y_nd[:n], experts_nk[:n], dict(load=load_e, dropped=dropped)


def _no_forced(body, x_nd, logits_ne, valid_n, *rest):
  return body(x_nd, logits_ne, valid_n, None, *rest)
