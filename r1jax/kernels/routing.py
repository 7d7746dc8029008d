"""MoE routing as Pallas kernels: scores -> group-limited top-k -> gates, and expert counts.

`route_pallas` is the kernel twin of `r1jax.model.moe.route` (without routing replay:
with forced experts there is no selection left to fuse). One kernel program handles a
block of tokens: scores (sigmoid or softmax), the selection value s + b, DeepSeek-V3's
group limit (a group scores the sum of its top-2; keep the best `topk_group`), then k
rounds of argmax-and-mask, and the gates normalised over the k chosen and scaled.
Ties break to the lowest index, as `lax.top_k` does, so the chosen experts match.

Every array stays 2-D [tokens, experts] with experts on the lane axis; the expert and
k axes are padded to powers of two (Triton needs them; on TPU they are lane-dense
anyway) with -inf logits, so a padded expert is never chosen.

Gradients: the kernel's weights are scores at the chosen experts, so the backward pass
is the reference `route` with those experts forced: exact, and no second kernel.

Sorting slots by expert stays in XLA (`jnp.argsort`, stable): a sort is not a natural
Pallas op and XLA's is fast on every backend. The tokens-per-expert histogram is a
small kernel (`expert_counts_pallas`): per-block one-hot sums, added up outside so the
grid stays parallel (no cross-program accumulation, which Triton cannot do).
Only interpret mode is exercised here (CPU); TPU and Triton lowering are untested.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from r1jax.kernels.gmm import compiler_params
from r1jax.model.moe import route


@dataclasses.dataclass(frozen=True)
class RouteOptions:
  top_k: int
  router: str
  n_group: int
  topk_group: int
  norm_topk_prob: bool
  routed_scaling_factor: float
  interpret: bool
  block_n: int


def _interpret(interpret):
  return jax.default_backend() == "cpu" if interpret is None else interpret


def _token_block(n: int, block_n: int) -> int:
  return max(16, min(pl.next_power_of_2(n), pl.next_power_of_2(block_n)))


def _pad_to(x, axis: int, size: int, value):
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _first_argmax(x, col, n: int):
  """Row max [bn, 1] and the lowest column reaching it [bn, 1]."""
  best = jnp.max(x, axis=1, keepdims=True)
  return best, jnp.min(jnp.where(x == best, col, n), axis=1, keepdims=True)


def _limit_groups(choice, col, n_experts: int, n_group: int, topk_group: int):
  """-inf outside the best topk_group groups; a group scores the sum of its top-2."""
  per_group = n_experts // n_group
  group = col // per_group  # padded experts fall in no real group
  score = jnp.full_like(choice, -jnp.inf)  # each group's score, broadcast over its experts
  for g in range(n_group):
    in_g = group == g
    vals = jnp.where(in_g, choice, -jnp.inf)
    top1, first = _first_argmax(vals, col, choice.shape[1])
    top2 = jnp.max(jnp.where(col == first, -jnp.inf, vals), axis=1, keepdims=True)
    score = jnp.where(in_g, top1 + top2, score)
  keep = jnp.zeros(choice.shape, jnp.bool_)
  for _ in range(topk_group):
    cand = jnp.where(keep, -jnp.inf, score)
    best = jnp.max(cand, axis=1, keepdims=True)
    best_group = jnp.min(jnp.where(cand == best, group, n_group), axis=1, keepdims=True)
    keep = keep | (group == best_group)
  return jnp.where(keep, choice, -jnp.inf)


def _route_kernel(logits_ref, bias_ref, weights_ref, experts_ref, *, opts: RouteOptions, n_experts: int):
  """logits_ref [bn, Ep], bias_ref [1, Ep] -> weights_ref fp32 / experts_ref int32 [bn, Kp]."""
  logits = logits_ref[...].astype(jnp.float32)
  col = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  if opts.router == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    scores = p / jnp.sum(p, axis=1, keepdims=True)
  choice = scores + bias_ref[...]
  if opts.n_group > 1:
    choice = _limit_groups(choice, col, n_experts, opts.n_group, opts.topk_group)
  slot = lax.broadcasted_iota(jnp.int32, weights_ref.shape, 1)
  weights = jnp.zeros(weights_ref.shape, jnp.float32)
  experts = jnp.zeros(experts_ref.shape, jnp.int32)
  for j in range(opts.top_k):
    _, idx = _first_argmax(choice, col, logits.shape[1])
    hit = col == idx
    gate = jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True)
    weights = jnp.where(slot == j, gate, weights)
    experts = jnp.where(slot == j, idx, experts)
    choice = jnp.where(hit, -jnp.inf, choice)
  if opts.norm_topk_prob:
    eps = 1e-20 if opts.router == "sigmoid" else 0.0  # as route(): sigmoid gates can all be ~0
    weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + eps)
  weights_ref[...] = weights * opts.routed_scaling_factor
  experts_ref[...] = experts


def _route_call(logits_ne, bias_e, opts: RouteOptions):
  n, e = logits_ne.shape
  ep, kp = pl.next_power_of_2(e), pl.next_power_of_2(opts.top_k)
  bn = _token_block(n, opts.block_n)
  np_ = pl.cdiv(n, bn) * bn
  logits = _pad_to(_pad_to(logits_ne.astype(jnp.float32), 1, ep, -jnp.inf), 0, np_, 0.0)
  bias = _pad_to(bias_e.astype(jnp.float32)[None, :], 1, ep, 0.0)
  weights, experts = pl.pallas_call(
      functools.partial(_route_kernel, opts=opts, n_experts=e),
      out_shape=(jax.ShapeDtypeStruct((np_, kp), jnp.float32), jax.ShapeDtypeStruct((np_, kp), jnp.int32)),
      grid=(np_ // bn,),
      in_specs=[pl.BlockSpec((bn, ep), lambda i: (i, 0)), pl.BlockSpec((1, ep), lambda i: (0, 0))],
      out_specs=(pl.BlockSpec((bn, kp), lambda i: (i, 0)), pl.BlockSpec((bn, kp), lambda i: (i, 0))),
      compiler_params=compiler_params(opts.interpret, ("parallel",)),
      interpret=opts.interpret,
      name="route",
  )(logits, bias)
  return weights[:n, :opts.top_k], experts[:n, :opts.top_k]


def _reference_kwargs(opts: RouteOptions):
  return dict(top_k=opts.top_k, router=opts.router, n_group=opts.n_group, topk_group=opts.topk_group,
              norm_topk_prob=opts.norm_topk_prob, routed_scaling_factor=opts.routed_scaling_factor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _route(logits_ne, bias_e, opts):
  return _route_call(logits_ne, bias_e, opts)


def _route_fwd(logits_ne, bias_e, opts):
  weights_nk, experts_nk = _route_call(logits_ne, bias_e, opts)
  return (weights_nk, experts_nk), (logits_ne, bias_e, experts_nk)


def _route_bwd(opts, res, cotangents):
  logits_ne, bias_e, experts_nk = res
  d_weights_nk, _ = cotangents
  # The bias only moves the selection, which has no gradient (as in route()).
  _, vjp = jax.vjp(lambda l: route(l, bias_e, forced_experts_nk=experts_nk, **_reference_kwargs(opts))[0],
                   logits_ne)
  return vjp(d_weights_nk)[0], jnp.zeros_like(bias_e)


_route.defvjp(_route_fwd, _route_bwd)


def route_pallas(logits_ne, bias_e, *, top_k: int, router: str, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float, interpret: bool | None = None,
                 block_n: int = 128):
  """Kernel twin of `route` (same kwargs, no forced experts).

  logits_ne [N, E], bias_e [E] -> (weights_nk fp32, experts_nk int32), both [N, k].
  Differentiable in logits_ne. interpret=None interprets on CPU.
  """
  opts = RouteOptions(top_k, router, n_group, topk_group, norm_topk_prob, float(routed_scaling_factor),
                      _interpret(interpret), block_n)
  return _route(logits_ne, bias_e, opts)


def _count_kernel(experts_ref, counts_ref):
  """experts_ref [bn, Kp] (-1 = padding) -> counts_ref [1, Ep] for this token block."""
  experts = experts_ref[...]
  bn, kp = experts.shape
  col = lax.broadcasted_iota(jnp.int32, (bn, counts_ref.shape[-1]), 1)
  slot = lax.broadcasted_iota(jnp.int32, experts.shape, 1)
  hits = jnp.zeros(col.shape, jnp.int32)
  for j in range(kp):
    # Pick column j by a masked reduction: Triton cannot slice a loaded tensor.
    expert_j = jnp.sum(jnp.where(slot == j, experts, 0), axis=1, keepdims=True)
    hits = hits + (col == expert_j).astype(jnp.int32)
  counts_ref[...] = jnp.sum(hits, axis=0, keepdims=True)


def expert_counts_pallas(experts_nk, n_experts: int, *, interpret: bool | None = None, block_n: int = 128):
  """Token slots per expert [E] int32 (= jnp.bincount(experts_nk.ravel(), length=E))."""
  interpret = _interpret(interpret)
  n, k = experts_nk.shape
  ep, kp = pl.next_power_of_2(n_experts), pl.next_power_of_2(k)
  bn = _token_block(n, block_n)
  np_ = pl.cdiv(n, bn) * bn
  experts = _pad_to(_pad_to(experts_nk.astype(jnp.int32), 1, kp, -1), 0, np_, -1)
  partial = pl.pallas_call(
      _count_kernel,
      out_shape=jax.ShapeDtypeStruct((np_ // bn, 1, ep), jnp.int32),
      grid=(np_ // bn,),
      in_specs=[pl.BlockSpec((bn, kp), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0)),
      compiler_params=compiler_params(interpret, ("parallel",)),
      interpret=interpret,
      name="expert_counts",
  )(experts)
  return partial.sum(axis=(0, 1))[:n_experts]


def sort_by_expert_pallas(experts_nk, n_experts: int, *, interpret: bool | None = None, block_n: int = 128):
  """Same contract as `r1jax.model.moe.sort_by_expert`: (order [N*k], group_sizes [E]).

  The permutation is XLA's stable argsort (see the module docstring); the counts are
  the histogram kernel.
  """
  order = jnp.argsort(experts_nk.reshape(-1), stable=True)
  return order, expert_counts_pallas(experts_nk, n_experts, interpret=interpret, block_n=block_n)
