"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 sec. 2.1.2).

Routing (`route`) and dispatch are plain functions so the Pallas kernels in
`r1jax.kernels` and the expert-parallel path have one reference to match.

One device (or plain jit auto-partitioning): the N*k token slots are sorted by expert,
run through a grouped SwiGLU FFN (`grouped_ffn`), un-permuted and weighted; nothing is
dropped. Under a mesh whose `expert` axis is > 1 the MoE runs expert-parallel instead
(`r1jax.model.expert_parallel`: shard_map + all_to_all), with the same routing and the
same grouped FFN on each device's local experts.

The grouped FFN (`cfg.moe_impl`; "auto", the default, picks per backend: blocked on
CPU, pallas on GPU, ragged on TPU -- `config.resolve_moe_impl`) on rows sorted by expert:
  ragged   lax.ragged_dot. Native on TPU; XLA:CPU expands it into a dense dot over all
           E groups with a row mask, so there it costs (and reports) ~E x the FLOPs.
  pallas   r1jax.kernels.gmm (and the Pallas routing kernel when not replaying).
  blocked  pure XLA: each group padded to a multiple of b rows, each row block's expert
           weights gathered, one batched matmul. FLOPs are (1 + E(b-1)/M) <= 1.2 x
           active on every backend, at the price of gathering ~M/b + E weight matrices
           (memory traffic, and transient memory, of that many [D, F] matrices).
  dense    every expert on every token (`dispatch_dense`): the slow, obvious reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.kernels import gmm as gmm_kernels
from r1jax.model.config import ModelConfig, resolve_moe_impl
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
  scores = router_scores(logits_ne, router)
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


def router_scores(logits_ne, router: str):
  """Token-to-expert affinities s (fp32): sigmoid (DeepSeek-V3 eq. 15) or softmax."""
  logits_ne = logits_ne.astype(jnp.float32)
  return jax.nn.sigmoid(logits_ne) if router == "sigmoid" else jax.nn.softmax(logits_ne, axis=-1)


def route_tokens(cfg: ModelConfig, logits_ne, bias_e, forced_experts_nk=None):
  """`route` with the config's settings; the Pallas routing kernel for moe_impl='pallas'
  (routing replay has no selection to fuse, so it always takes `route`)."""
  kw = dict(top_k=cfg.top_k, router=cfg.router, n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
  if resolve_moe_impl(cfg.moe_impl) == "pallas" and forced_experts_nk is None:
    from r1jax.kernels import routing  # pylint: disable=import-outside-toplevel
    return routing.route_pallas(logits_ne, bias_e, **kw)
  return route(logits_ne, bias_e, forced_experts_nk=forced_experts_nk, **kw)


def sort_by_expert(experts_nk, n_experts: int):
  """Permutation sorting the N*k token slots by expert, and tokens per expert [E]."""
  flat = experts_nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
  return order, group_sizes


def inverse_permutation(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


# --- The grouped FFN on rows sorted by expert ------------------------------------------


def grouped_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, act, impl: str = "ragged"):
  """SwiGLU experts on rows sorted by expert: rows [offset_e, offset_e + size_e) use
  expert e, rows past sum(size_e) come out 0. [M, D] -> [M, D]."""
  if impl == "blocked":
    return _blocked_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, act)
  if impl == "dense":
    return _masked_dense_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, act)
  if impl == "pallas":
    gmm = gmm_kernels.gmm
  else:
    gmm = jax.lax.ragged_dot
  h_mf = act(gmm(x_md, w_gate_edf, group_sizes_e)) * gmm(x_md, w_up_edf, group_sizes_e)
  return gmm(h_mf, w_down_efd, group_sizes_e)


def _row_experts(group_sizes_e, m: int):
  """Expert of each sorted row [M]; E for rows past the last group."""
  return jnp.searchsorted(jnp.cumsum(group_sizes_e), jnp.arange(m), side="right").astype(jnp.int32)


def _masked_dense_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, act):
  """Every expert on every row, each row keeping its own expert's output."""
  e = w_gate_edf.shape[0]
  onehot_me = jax.nn.one_hot(_row_experts(group_sizes_e, x_md.shape[0]), e, dtype=x_md.dtype)
  h = act(jnp.einsum("md,edf->emf", x_md, w_gate_edf)) * jnp.einsum("md,edf->emf", x_md, w_up_edf)
  return jnp.einsum("emf,efd,me->md", h, w_down_efd, onehot_me)


# Rows of compute (2 x 3 D F FLOPs each) that cost as long as gathering one expert's
# three weight matrices (3 D F fp32 values): 2 x matmul FLOP/s / copy bytes/s, ~64 on
# the 2-core CPU the blocked FFN is the default for (197 GFLOP/s, 6.2 GB/s; bench/).
BLOCK_GATHER_ROWS = 64


def block_rows(m: int, n_experts: int, max_block: int = 512) -> int:
  """Rows per block b for the blocked FFN. Padding each of E groups to a multiple of b
  adds at most E(b-1) rows to M, so b - 1 <= M / 5E keeps the expert FLOPs within 1.2x
  of the active ones (room for the router and the elementwise work under 1.25x). Each
  of the ~M/b + E blocks also gathers (copies) its expert's weights, worth
  BLOCK_GATHER_ROWS rows of compute: (M/b + E)(BLOCK_GATHER_ROWS + b) is least at
  b = sqrt(M BLOCK_GATHER_ROWS / E), which wins for small M (a GRPO prompt pass of 512
  slots over 8 experts: 15 blocks of 64 rows instead of 46 of 13)."""
  fewer_gathers = math.isqrt(m * BLOCK_GATHER_ROWS // n_experts)
  return max(1, min(max_block, max(1 + m // (5 * n_experts), fewer_gathers)))


def block_layout(group_sizes_e, m: int, b: int):
  """Where sorted rows sit when each group is padded to whole blocks of b rows.

  Returns (src_p, valid_p, expert_j, dst_r): padded row p takes sorted row src_p when
  valid_p; block j uses expert expert_j (E: unused block); sorted row r lands at padded
  row dst_r (-1 past the last group). n_blocks = (M + E(b-1)) // b bounds
  sum_e ceil(size_e / b) for any sizes summing to <= M.
  """
  e = group_sizes_e.shape[0]
  n_blocks = (m + e * (b - 1)) // b
  blocks_e = (group_sizes_e + b - 1) // b
  block_end_e = jnp.cumsum(blocks_e)
  block_start_e = block_end_e - blocks_e
  row_start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
  expert_j = jnp.searchsorted(block_end_e, jnp.arange(n_blocks), side="right").astype(jnp.int32)
  ej = jnp.minimum(expert_j, e - 1)
  p = jnp.arange(n_blocks * b)
  j = p // b
  offset_p = p - block_start_e[ej][j] * b
  valid_p = (expert_j[j] < e) & (offset_p < group_sizes_e[ej][j])
  src_p = jnp.where(valid_p, row_start_e[ej][j] + offset_p, 0)
  er = _row_experts(group_sizes_e, m)
  erc = jnp.minimum(er, e - 1)
  dst_r = jnp.where(er < e, block_start_e[erc] * b + jnp.arange(m) - row_start_e[erc], -1)
  return src_p, valid_p, expert_j, dst_r


def _blocked_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, act):
  m, d = x_md.shape
  e = w_gate_edf.shape[0]
  b = block_rows(m, e)
  src_p, valid_p, expert_j, dst_r = block_layout(group_sizes_e, m, b)
  x_jbd = jnp.where(valid_p[:, None], x_md[src_p], 0).reshape(-1, b, d)
  ej = jnp.minimum(expert_j, e - 1)  # an unused block multiplies zeros
  h = act(jnp.einsum("jbd,jdf->jbf", x_jbd, w_gate_edf[ej])) * jnp.einsum("jbd,jdf->jbf", x_jbd, w_up_edf[ej])
  y_pd = jnp.einsum("jbf,jfd->jbd", h, w_down_efd[ej]).reshape(-1, d)
  return jnp.where((dst_r >= 0)[:, None], y_pd[jnp.maximum(dst_r, 0)], 0)


# --- Dispatch on one device -------------------------------------------------------------


def dispatch_sorted(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd, act, impl="ragged"):
  """Drop-less dispatch: sort slots by expert, grouped FFN, un-permute, weight."""
  n, k = experts_nk.shape
  order, group_sizes = sort_by_expert(experts_nk, w_gate_edf.shape[0])
  x_sorted = x_nd[order // k]  # slot j of token i sits at flat index i*k + j
  y_sorted = grouped_ffn(x_sorted, group_sizes, w_gate_edf, w_up_edf, w_down_efd, act, impl)
  y_nkd = y_sorted[inverse_permutation(order)].reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_nkd, weights_nk.astype(y_nkd.dtype))


def dispatch_dense(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd, act):
  """Reference: every expert on every token, combined with a one-hot weight matrix."""
  n, e = x_nd.shape[0], w_gate_edf.shape[0]
  h = act(jnp.einsum("nd,edf->enf", x_nd, w_gate_edf)) * jnp.einsum("nd,edf->enf", x_nd, w_up_edf)
  y_end = jnp.einsum("enf,efd->end", h, w_down_efd)
  combine_ne = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_nk].add(weights_nk)
  return jnp.einsum("end,ne->nd", y_end, combine_ne.astype(y_end.dtype))


# --- Balance statistics -----------------------------------------------------------------


def sequence_balance_loss(logits_bte, experts_btk, *, router: str, alpha: float, mask_bt=None):
  """Complementary sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), mean over rows.

  Per sequence of T tokens: L = alpha * sum_i f_i P_i, with f_i = E / (k T) * #tokens
  choosing expert i and P_i = mean_t s'_{i,t}, s' the affinities normalised over all
  experts. Only P carries a gradient. Padding (mask 0) is left out of T and the sums.
  """
  b, t, e = logits_bte.shape
  k = experts_btk.shape[-1]
  mask_bt = jnp.ones((b, t), jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
  scores = router_scores(logits_bte, router)
  s_norm = scores / (scores.sum(-1, keepdims=True) + 1e-20)
  tokens_b = mask_bt.sum(-1)
  per_token = jnp.broadcast_to(mask_bt[..., None], experts_btk.shape)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], experts_btk.shape)
  counts_be = jnp.zeros((b, e), jnp.float32).at[rows, experts_btk].add(per_token)
  f_be = e / k * counts_be / jnp.maximum(tokens_b, 1.0)[:, None]
  p_be = jnp.einsum("bte,bt->be", s_norm, mask_bt) / jnp.maximum(tokens_b, 1.0)[:, None]
  has_tokens = (tokens_b > 0).astype(jnp.float32)
  per_row = (f_be * p_be).sum(-1) * has_tokens
  return alpha * per_row.sum() / jnp.maximum(has_tokens.sum(), 1.0)


def expert_load(experts_btk, mask_bt, n_experts: int):
  """Token slots routed to each expert [E], counting only unmasked tokens."""
  weights = jnp.broadcast_to(mask_bt[..., None], experts_btk.shape).reshape(-1)
  return jnp.zeros((n_experts,), jnp.float32).at[experts_btk.reshape(-1)].add(weights.astype(jnp.float32))


# --- The module -------------------------------------------------------------------------


class MoE(nnx.Module):
  """Shared experts (always on) plus top-k of n_experts routed experts.

  mesh: the device mesh for expert parallelism. None (the default) takes the mesh in
  context when the call is traced (`with jax.set_mesh(mesh):`); either way the MoE runs
  expert-parallel exactly when that mesh has an `expert` axis > 1.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
    d, e, f, std = cfg.d_model, cfg.n_experts, cfg.moe_d_ff, cfg.init_std
    self.cfg = cfg
    self.mesh = mesh
    self.router = param(rngs, (d, e), ("embed", None), std)
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=(None,))
    self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std)
    self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std)
    self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std)
    if cfg.n_shared_experts:
      self.shared = MLP(cfg, cfg.moe_d_ff * cfg.n_shared_experts, rngs)

  def __call__(self, x_btd, forced_experts_btk=None):
    """[B, T, D] -> (y_btd, experts_btk): the contract the decoder block relies on."""
    y_btd, aux = self.forward(x_btd, forced_experts_btk)
    return y_btd, aux["experts"]

  def forward(self, x_btd, forced_experts_btk=None, mask_bt=None):
    """[B, T, D] -> (y_btd, aux). aux: experts [B, T, k] int32; load [E] slots each
    expert processed; dropped: slots dropped by a capacity (0 when drop-less);
    balance_loss: alpha * the sequence-wise balance loss (0.0 when alpha = 0)."""
    from r1jax.model import expert_parallel  # pylint: disable=import-outside-toplevel
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    logits_ne = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), self.router[...].astype(jnp.float32))
    forced_nk = None if forced_experts_btk is None else forced_experts_btk.reshape(b * t, -1)
    ws = [w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)]
    act = activation(cfg.hidden_act)
    mesh = expert_parallel.expert_mesh(self.mesh)
    if mesh is not None:
      y_nd, experts_nk, stats = expert_parallel.moe_expert_parallel(
          cfg, mesh, x_nd, logits_ne, self.bias[...], forced_nk, *ws)
    else:
      weights_nk, experts_nk = route_tokens(cfg, logits_ne, self.bias[...], forced_nk)
      impl = resolve_moe_impl(cfg.moe_impl)
      if impl == "dense":
        y_nd = dispatch_dense(x_nd, weights_nk, experts_nk, *ws, act)
      else:
        y_nd = dispatch_sorted(x_nd, weights_nk, experts_nk, *ws, act, impl)
      stats = dict(load=jnp.bincount(experts_nk.reshape(-1), length=cfg.n_experts).astype(jnp.float32),
                   dropped=jnp.zeros((), jnp.int32))
    y_btd = y_nd.reshape(b, t, d).astype(dt)
    if cfg.n_shared_experts:
      y_btd = y_btd + self.shared(x_btd)
    experts_btk = experts_nk.reshape(b, t, -1)
    balance = jnp.zeros((), jnp.float32)
    if cfg.seq_balance_alpha:
      balance = sequence_balance_loss(logits_ne.reshape(b, t, -1), experts_btk, router=cfg.router,
                                      alpha=cfg.seq_balance_alpha, mask_bt=mask_bt)
    return y_btd, dict(experts=experts_btk, balance_loss=balance, **stats)
