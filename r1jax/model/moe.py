"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 sec. 2.1.2).

Routing (`route`) and dispatch are plain functions so the Pallas kernels in
`r1jax.kernels` have a reference to match. Dispatch is drop-less: token slots are sorted
by expert, run through a grouped matmul (`lax.ragged_dot`), un-permuted and weighted.
`dispatch_dense` runs every expert on every token; it is the slow, obvious reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.model.config import ModelConfig
from r1jax.model.layers import MLP, activation, dtype_of, param


class RouterBias(nnx.Variable):
  """The aux-loss-free balancing bias b_i (DeepSeek-V3 eq. 16).

  Not an nnx.Param: the optimizer never sees it. It only shifts which experts are
  selected, never the gating weights, and is nudged by +-gamma after each step.
  """


def route(logits_ne, bias_e, *, top_k: int, router: str, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float, forced_experts_nk=None):
  """Top-k routing. Returns (weights_nk fp32, experts_nk int32).

  sigmoid (DeepSeek-V3): s = sigmoid(u.e); choose top-k of s + b within the best
  `topk_group` of `n_group` groups (a group scores the sum of its top-2); gate g = s of
  the chosen, normalised over the k chosen, times the routed scaling factor.
  softmax (Qwen3-MoE): s = softmax(logits); top-k of s; optionally renormalised.
  With forced_experts_nk (routing replay), the choice is given and only the weights
  are recomputed from the current scores, so gradients still reach the router.
  """
  logits_ne = logits_ne.astype(jnp.float32)
  n, e = logits_ne.shape
  scores = jax.nn.sigmoid(logits_ne) if router == "sigmoid" else jax.nn.softmax(logits_ne, axis=-1)
  if forced_experts_nk is None:
    choice = scores + bias_e.astype(jnp.float32)
    if n_group > 1:
      grouped = choice.reshape(n, n_group, e // n_group)
      group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, n_group]
      _, best_groups = jax.lax.top_k(group_score, topk_group)
      keep_group = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], best_groups].set(True)
      keep = jnp.repeat(keep_group, e // n_group, axis=1)
      choice = jnp.where(keep, choice, -jnp.inf)
    _, experts_nk = jax.lax.top_k(choice, top_k)
  else:
    experts_nk = forced_experts_nk
  experts_nk = jax.lax.stop_gradient(experts_nk).astype(jnp.int32)
  weights = jnp.take_along_axis(scores, experts_nk, axis=-1)
  if norm_topk_prob:
    eps = 1e-20 if router == "sigmoid" else 0.0
    weights = weights / (weights.sum(-1, keepdims=True) + eps)
  return weights * routed_scaling_factor, experts_nk


def sort_by_expert(experts_nk, n_experts: int):
  """Permutation sorting the N*k token slots by expert, and tokens per expert [E]."""
  flat = experts_nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
  return order, group_sizes


def dispatch_ragged(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd, act, gmm=None):
  """Drop-less dispatch: sort slots by expert, grouped matmuls, un-permute, weight."""
  gmm = gmm or (lambda lhs, rhs, gs: jax.lax.ragged_dot(lhs, rhs, gs))
  n, k = experts_nk.shape
  order, group_sizes = sort_by_expert(experts_nk, w_gate_edf.shape[0])
  x_sorted = x_nd[order // k]  # slot j of token i sits at flat index i*k + j
  h = act(gmm(x_sorted, w_gate_edf, group_sizes)) * gmm(x_sorted, w_up_edf, group_sizes)
  y_sorted = gmm(h, w_down_efd, group_sizes)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y_nkd = y_sorted[inverse].reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_nkd, weights_nk.astype(y_nkd.dtype))


def dispatch_dense(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd, act):
  """Reference: every expert on every token, combined with a one-hot weight matrix."""
  n, e = x_nd.shape[0], w_gate_edf.shape[0]
  h = act(jnp.einsum("nd,edf->enf", x_nd, w_gate_edf)) * jnp.einsum("nd,edf->enf", x_nd, w_up_edf)
  y_end = jnp.einsum("enf,efd->end", h, w_down_efd)
  combine_ne = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_nk].add(weights_nk)
  return jnp.einsum("end,ne->nd", y_end, combine_ne.astype(y_end.dtype))


class MoE(nnx.Module):
  """Shared experts (always on) plus top-k of n_experts routed experts."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, e, f, std = cfg.d_model, cfg.n_experts, cfg.moe_d_ff, cfg.init_std
    self.cfg = cfg
    self.router = param(rngs, (d, e), ("embed", None), std)
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=(None,))
    self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std)
    self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std)
    self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std)
    if cfg.n_shared_experts:
      self.shared = MLP(cfg, cfg.moe_d_ff * cfg.n_shared_experts, rngs)

  def __call__(self, x_btd, forced_experts_btk=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), self.router[...].astype(jnp.float32))
    forced = None if forced_experts_btk is None else forced_experts_btk.reshape(b * t, -1)
    weights, experts = route(
        logits, self.bias[...], top_k=cfg.top_k, router=cfg.router, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, forced_experts_nk=forced)
    ws = [w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)]
    act = activation(cfg.hidden_act)
    if cfg.moe_impl == "dense":
      y = dispatch_dense(x_nd, weights, experts, *ws, act)
    elif cfg.moe_impl == "pallas":
      from r1jax.kernels import gmm as gmm_kernels  # pylint: disable=import-outside-toplevel
      y = dispatch_ragged(x_nd, weights, experts, *ws, act, gmm=gmm_kernels.gmm)
    else:
      y = dispatch_ragged(x_nd, weights, experts, *ws, act)
    y = y.reshape(b, t, d).astype(dt)
    if cfg.n_shared_experts:
      y = y + self.shared(x_btd)
    return y, experts.reshape(b, t, -1)


def expert_load(experts_btk, mask_bt, n_experts: int):
  """Token slots routed to each expert [E], counting only unmasked tokens."""
  weights = jnp.broadcast_to(mask_bt[..., None], experts_btk.shape).reshape(-1)
  return jnp.zeros((n_experts,), jnp.float32).at[experts_btk.reshape(-1)].add(weights.astype(jnp.float32))
