"""The MoE layer on the sampling path (calls with a cache: prefill and decode steps).

Same routing (`moe.route`), experts and weights as `MoE.__call__`, another dispatch.
Why: a decode step routes only N = B tokens, ~N*k/E per expert. lax.ragged_dot over the
N*k rows costs E dense dots on XLA:CPU (E x the FLOPs), and padding groups to fixed row
blocks gathers (copies) one weight matrix per block every step. Here each expert takes
its tokens in a [C, D] buffer and one batched matmul [E, C, D] x [E, D, F] reads every
expert's weights once, in place (GShard's capacity layout). It stays drop-less: C is the
smallest of `moe_capacities` that holds this call's busiest expert, picked by lax.switch
at run time, so a balanced call pays ~1.25-1.5x the active FLOPs; a call whose busiest
expert overflows the largest capacity runs the sorted grouped FFN instead. (Measured
alternative: one window per expert sized to its own load does half the FLOPs, but
XLA:CPU copies each W[e] slice every step and does not hoist it out of the decode loop:
no faster, and 6x the compile.)

Expert-parallel rollouts (`generate(mesh=...)` on a mesh with an `expert` axis > 1): the
decode rows are split over the batch axes, the routed experts over `expert`, so each
device holds E / ep experts (the weights the sampler hands the model are that slice).
Each device routes its own tokens, all-gathers the tokens of its `expert` group (a
decode step's [N, D] rows: small next to the expert weights), runs the slots routed to
its own experts through the same capacity layout, and a psum_scatter sums every
device's share back onto the devices that own the tokens. This is DeepSeek-V3's
inference layout (sec. 3.4: attention data-parallel, experts expert-parallel); next to
every device holding every expert it divides the expert FLOPs and weight bytes per
device by ep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from r1jax.model import expert_parallel
from r1jax.model.config import resolve_moe_impl
from r1jax.model.layers import activation, dtype_of
from r1jax.model.moe import MoE, route

# Rows per expert, as multiples of the mean expert load N*k/E, rounded up to a multiple
# of 8 rows (see moe_capacities).
CAPACITY_FACTORS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def moe_capacities(n_tokens: int, n_experts: int, top_k: int) -> list[int]:
  """Rows per expert cached_moe can run with: CAPACITY_FACTORS x the mean load N*k/E,
  rounded up to multiples of 8, at most N (no expert can get more: a token's top-k
  experts are distinct)."""
  mean = n_tokens * top_k / n_experts
  return sorted({min(n_tokens, 8 * -(-int(-(-f * mean // 1)) // 8)) for f in CAPACITY_FACTORS})


def cached_moe(moe: MoE, x_btd, forced_experts_btk=None):
  """[B, T, D] -> (y_btd, experts_btk), like MoE.__call__ (see the module docstring).

  When the module holds fewer than n_experts routed experts it is running inside the
  sampler's expert-parallel shard_map, and its experts are this device's slice along
  the `expert` mesh axis.
  """
  cfg, dt = moe.cfg, dtype_of(moe.cfg.dtype)
  b, t, d = x_btd.shape
  n, k = b * t, cfg.top_k
  x_nd = x_btd.reshape(n, d)
  logits_ne = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), moe.router[...].astype(jnp.float32))
  forced_nk = None if forced_experts_btk is None else forced_experts_btk.reshape(n, k)
  weights_nk, experts_nk = route(
      logits_ne, moe.bias[...], top_k=k, router=cfg.router, n_group=cfg.n_group,
      topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
      routed_scaling_factor=cfg.routed_scaling_factor, forced_experts_nk=forced_nk)
  ws = tuple(w[...].astype(dt) for w in (moe.w_gate, moe.w_up, moe.w_down))
  e_local = ws[0].shape[0]
  run = lambda x, w, slot_expert: _routed(x, w, slot_expert, ws, cfg)
  if e_local == cfg.n_experts:
    y_nd = run(x_nd, weights_nk, experts_nk.reshape(-1))
  else:
    y_nd = _expert_parallel(run, x_nd, weights_nk, experts_nk, e_local)
  y_btd = y_nd.reshape(b, t, d).astype(dt)
  if cfg.n_shared_experts:
    y_btd = y_btd + moe.shared(x_btd)
  return y_btd, experts_nk.reshape(b, t, k)


def _expert_parallel(run, x_nd, weights_nk, experts_nk, e_local: int):
  """This device's tokens through the experts of its whole `expert` group."""
  axis = expert_parallel.EXPERT_AXIS
  gather = lambda a: lax.all_gather(a, axis, tiled=True)  # device order = token order
  first = lax.axis_index(axis) * e_local
  local_m = gather(experts_nk).reshape(-1) - first
  # Slots routed to another device's experts get the id e_local: no buffer row, output 0.
  slot_expert = jnp.where((local_m >= 0) & (local_m < e_local), local_m, e_local)
  y_nd = run(gather(x_nd), gather(weights_nk), slot_expert)
  return lax.psum_scatter(y_nd, axis, scatter_dimension=0, tiled=True)


def _routed(x_nd, weights_nk, slot_expert_m, ws, cfg):
  """sum_k gate * expert(x) over the slots of the experts in `ws`; slot m (token m // k,
  its (m % k)-th choice) uses expert slot_expert_m[m], or none when it is len(ws[0])."""
  n, d = x_nd.shape
  k = weights_nk.shape[1]
  e = ws[0].shape[0]
  act = activation(cfg.hidden_act)
  onehot_me = jax.nn.one_hot(slot_expert_m, e, dtype=jnp.int32)  # all zero for "none"
  rank_m = jnp.sum((jnp.cumsum(onehot_me, axis=0) - 1) * onehot_me, axis=-1)
  busiest = jnp.max(jnp.sum(onehot_me, axis=0))
  x_md = x_nd[jnp.arange(n * k) // k]
  mine_m = slot_expert_m < e

  def with_capacity(capacity):
    def ffn(x_md):
      # Slots of no expert here aim past the buffer: the scatter drops them.
      dest_m = jnp.where(mine_m, slot_expert_m * capacity + rank_m, e * capacity)
      x_ecd = jnp.zeros((e * capacity, d), x_md.dtype).at[dest_m].set(x_md, mode="drop").reshape(e, capacity, d)
      h_ecf = act(jnp.einsum("ecd,edf->ecf", x_ecd, ws[0])) * jnp.einsum("ecd,edf->ecf", x_ecd, ws[1])
      y_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, ws[2])
      return y_ecd.reshape(e * capacity, d).at[dest_m].get(mode="fill", fill_value=0)
    return ffn

  # Per device, the mean load is over the tokens seen here (all of the expert group's)
  # and the n_experts of the whole model: the same capacities as on one device.
  capacities = moe_capacities(n, cfg.n_experts, k)
  branches = [with_capacity(c) for c in capacities]
  if capacities[-1] < n:  # a skewed call: the sorted grouped FFN (empty rows for "none")
    impl = resolve_moe_impl(cfg.moe_impl)
    branches.append(lambda x_md: expert_parallel.local_experts(x_md, slot_expert_m, e, *ws, act, impl)[0])
  branch = jnp.minimum(jnp.sum(busiest > jnp.asarray(capacities, jnp.int32)), len(branches) - 1)
  y_md = lax.switch(branch, branches, x_md)
  return jnp.einsum("nkd,nk->nd", y_md.reshape(n, k, d), weights_nk.astype(y_md.dtype))
