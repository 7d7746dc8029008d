"""Attention: grouped-query attention (Llama / Qwen) and Multi-head Latent Attention (DeepSeek).

Both take a `KeyMask` (which keys each query sees, as position and segment ids; each
attention call, or each block of queries with model.attention_chunk, builds its own
boolean [B, T, S] from it), the RoPE tables (built once per forward), and optionally a
layer cache. A cache holds one slot per position (slot s stores position s), so writing
token t of row b is a scatter at (b, positions[b, t]); continuous batching can then reset
and refill a single row (every cache array has the batch row on axis 0).

GQA caches keys [B, K, Dh, S] and values [B, K, S, Dh]: the layouts XLA reads fastest
in a decode step (see _cached_attention). MLA caches only what DeepSeek-V2 section 2.1.2 says is
needed: the normalised latent c_kv [B, S, R] and the shared RoPE key [B, S, Dr]; decoding
with a cache uses the absorbed form (W_uk folded into the query, W_uv applied after the
weighted sum), so the per-head keys and values are never materialised.

Without a cache, each attention also returns its keys and values (GQA: k, v; MLA: the
per-head k_nope, v and the shared k_rope), unused (and compiled away) except by the GRPO
update's prompt forward: those of a group's prompt come back as a `PrefixKV` in place of
the cache, and each of the group's G completion rows attends to them and causally to its
own tokens (r1jax.rl.trainer.prefix_shared_hidden).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.model.config import ModelConfig
from r1jax.model.layers import RMSNorm, dtype_of, param, project, rope_inv_freq, softmax_scale

# DeepSeek's reference (inference/model.py) and transformers both build MLA's q/kv latent
# norms with RMSNorm's default eps, whatever rms_norm_eps the config gives the other norms.
MLA_NORM_EPS = 1e-6
NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, not NaN


def rope_tables(cfg: ModelConfig, positions_bt):
  """(cos, sin) [B, T, 1, Dr/2] of `layers.apply_rope` (attention factor folded in).

  The decoder computes them once per forward and every layer reuses them, instead of
  every layer repeating the same cos/sin work.
  """
  inv_freq, attention_factor = rope_inv_freq(cfg)
  angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dr/2]
  cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
  if jax.default_backend() == "cpu":
    # XLA:CPU fuses cos/sin into every layer's rotation, evaluating them per element of
    # q and k, heads included (~8% of a GRPO update). A dot is never fused into its
    # consumers, so multiplying by the identity (exact) makes the tables materialise once.
    # (optimization_barrier does not: XLA:CPU lowers it to control dependencies.)
    cs = jnp.concatenate([cos, sin], axis=-1)
    cs = jnp.einsum("btr,rs->bts", cs, jnp.eye(cs.shape[-1], dtype=cs.dtype), precision=jax.lax.Precision.HIGHEST)
    cos, sin = jnp.split(cs, 2, axis=-1)
  return cos[..., None, :], sin[..., None, :]


def rotate(x, tables, interleaved: bool):
  """`layers.apply_rope` of x [B, T, H, Dr] with precomputed rope_tables (same math)."""
  cos, sin = tables
  if interleaved:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def masked_softmax(scores, mask):
  """Softmax over the last axis in fp32, masked positions set to NEG_INF."""
  scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


class KeyMask(NamedTuple):
  """Which keys each query attends to, kept as per-position ids rather than a [B, T, S]
  boolean array, so a block of queries builds only its own rows (`over_query_blocks`):
  at T = 32K a dense mask is 1 GiB a row. Query t of row b sees key s when they share a
  segment, the key is not padding (segment 0), and k_pos[b, s] <= q_pos[b, t].
  A forward without a cache compares the tokens with themselves; with a cache, the keys
  are the slots (k_pos = slot index, k_seg = 1 where the slot holds a token)."""
  q_pos: jax.Array  # [B, T] int32
  q_seg: jax.Array  # [B, T] int32
  k_pos: jax.Array  # [B, S] int32
  k_seg: jax.Array  # [B, S] int32

  def dense(self):
    """[B, T, S] bool."""
    same = self.q_seg[:, :, None] == self.k_seg[:, None, :]
    return same & (self.k_seg[:, None, :] > 0) & (self.k_pos[:, None, :] <= self.q_pos[:, :, None])


class PrefixKV(NamedTuple):
  """One layer's keys and values of B prompts, each continued by G consecutive rows.

  kv: what the layer returned in the prompt's own forward, [B, Tp, ...] each.
  valid: [B, Tp] bool, the prompt's real tokens (not left padding).
  Every completion query sees all of its prompt's real tokens: they precede it."""
  kv: dict
  valid: jax.Array


def with_prompt(prefix: PrefixKV, own_kv: dict, mask_rts):
  """Each row's keys and values preceded by its group's prompt's, and the mask to match.

  prefix.kv [B, Tp, ...] per prompt, own_kv [R, N, ...] per row (R = B x G rows, the G
  rows of a prompt consecutive), mask_rts [R, T, N]. Returns ({name: [R, Tp + N, ...]},
  mask [R, T, Tp + N]). The prompt's forward ran once per group; only its keys and values
  (Tp tokens a layer) are copied to the G rows, so the attention is one product per row
  over all the keys it sees, with no score-sized concatenation or slicing (each costs a
  copy of the [T, Tp + N] scores per head, in the forward and again in the backward)."""
  r, b = mask_rts.shape[0], prefix.valid.shape[0]
  kv = {name: jnp.concatenate([jnp.repeat(prefix.kv[name], r // b, axis=0), x], axis=1)
        for name, x in own_kv.items()}
  valid_rs = jnp.repeat(prefix.valid, r // b, axis=0)
  t, tp = mask_rts.shape[1], valid_rs.shape[1]
  return kv, jnp.concatenate([jnp.broadcast_to(valid_rs[:, None, :], (r, t, tp)), mask_rts], axis=-1)


def attention(q_btkgd, k_bskd, v_bskd, mask_bts, scale: float):
  """Softmax attention of queries [B, T, K, G, Dq] (G query heads per key / value head)
  over keys [B, S, K, Dq] and values [B, S, K, Dv]; mask [B, T, S]. Returns
  [B, T, K, G, Dv].

  Why the reshapes: the products run as 3-D batched matmuls over N = B x K, with the
  queries' (T, G) as one row axis. XLA:CPU runs those on its operands as laid out, with
  either contraction axis, so only q, k, v and the output are transposed, in the forward
  and the backward. A 5-D einsum with batch axes (b, k) and free axes (g, t) made it
  transpose the [T, S] probabilities and their gradients as well: ~60 MB of copies a
  layer in a GRPO update pass of 16 rows, against ~22 MB this way (bench/NOTES.md,
  session 14)."""
  b, t, k, g, dq = q_btkgd.shape
  s, dv = k_bskd.shape[1], v_bskd.shape[-1]
  q_nqd = jnp.transpose(q_btkgd, (0, 2, 1, 3, 4)).reshape(b * k, t * g, dq)
  k_nsd = jnp.transpose(k_bskd, (0, 2, 1, 3)).reshape(b * k, s, dq)
  v_nsd = jnp.transpose(v_bskd, (0, 2, 1, 3)).reshape(b * k, s, dv)
  scores = jnp.einsum("nqd,nsd->nqs", q_nqd, k_nsd, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores.reshape(b, k, t, g, s) * scale, mask_bts[:, None, :, None, :])
  out = jnp.einsum("nqs,nsd->nqd", probs.reshape(b * k, t * g, s).astype(v_nsd.dtype), v_nsd)
  return jnp.transpose(out.reshape(b, k, t, g, dv), (0, 2, 1, 3, 4))


def over_query_blocks(attend, queries, mask: KeyMask, chunk: int):
  """attend(queries, mask_bts) -> [B, T, ...], run on blocks of `chunk` queries at a time.

  queries: an array or a tuple of arrays, each [B, T, ...]. Every block sees all S keys,
  so the values are the whole call's; what changes is memory: the fp32 scores and
  probabilities of a block are [B, H, chunk, S] instead of [B, H, T, S], and each block
  is a jax.checkpoint, so the backward pass recomputes its scores instead of keeping
  [T, S] of them per layer (the quadratic term of long reasoning traces: at T = 32K one
  head's fp32 scores are 4 GiB a row). Blocks run one after another (lax.map); padding
  queries past T see no keys and are dropped. FLOPs are the same as the whole call's:
  fully masked (future) key blocks are not skipped.
  """
  single = not isinstance(queries, tuple)
  queries = (queries,) if single else queries
  b, t = mask.q_pos.shape
  if not chunk or t <= chunk:
    return attend(queries[0] if single else queries, mask.dense())
  n = -(-t // chunk)
  pad = n * chunk - t

  def blocks(x, fill=0):  # [B, T, ...] -> [n, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  def one(args):
    q, q_pos, q_seg = args
    block_mask = mask._replace(q_pos=q_pos, q_seg=q_seg).dense()
    return attend(q[0] if single else q, block_mask)

  # Padding queries get segment -1: no key matches it.
  per_block = (tuple(blocks(q) for q in queries), blocks(mask.q_pos), blocks(mask.q_seg, fill=-1))
  out = jax.lax.map(jax.checkpoint(one), per_block)
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape((b, n * chunk) + out.shape[3:])[:, :t]


def write_cache(cache_bs, new_bt, positions_bt):
  """Scatters new_bt [B, T, ...] into cache_bs [B, S, ...] at slot = position."""
  rows = jnp.arange(cache_bs.shape[0])[:, None]
  return cache_bs.at[rows, positions_bt].set(new_bt.astype(cache_bs.dtype), mode="drop")


def write_keys_t(cache_bkds, new_btkd, positions_bt):
  """Scatters new_btkd [B, T, K, Dh] into a slots-last key cache [B, K, Dh, S]."""
  rows = jnp.arange(cache_bkds.shape[0])[:, None]
  return cache_bkds.at[rows, :, :, positions_bt].set(new_btkd.astype(cache_bkds.dtype), mode="drop")


def write_cache_heads(cache_bksd, new_btkd, positions_bt):
  """Scatters new_btkd [B, T, K, Dh] into a heads-major cache [B, K, S, Dh] at slot = position.

  (rows, :, positions) indexes a [B, T, K, Dh] block (numpy puts the advanced-index
  dims first), so the new keys need no transpose.
  """
  rows = jnp.arange(cache_bksd.shape[0])[:, None]
  return cache_bksd.at[rows, :, positions_bt].set(new_btkd.astype(cache_bksd.dtype), mode="drop")


class GQAttention(nnx.Module):
  """Multi-head attention with n_kv_heads <= n_heads shared key/value heads."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k, dh, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.init_std
    self.cfg = cfg
    self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std)
    self.wv = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std)
    self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std)
    if cfg.qkv_bias:
      self.bq = param(rngs, (h, dh), ("heads", "head_dim"), 0.0)
      self.bk = param(rngs, (k, dh), ("kv_heads", "head_dim"), 0.0)
      self.bv = param(rngs, (k, dh), ("kv_heads", "head_dim"), 0.0)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(dh, cfg.norm_eps, rngs, axis_name="head_dim")
      self.k_norm = RMSNorm(dh, cfg.norm_eps, rngs, axis_name="head_dim")

  def __call__(self, x_btd, positions_bt, mask: KeyMask, cache=None, rope=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    rope = rope_tables(cfg, positions_bt) if rope is None else rope
    q = project(x_btd, self.wq[...].astype(dt))
    k = project(x_btd, self.wk[...].astype(dt))
    v = project(x_btd, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rotate(q, rope, interleaved=False), rotate(k, rope, interleaved=False)
    b, t, h, dh = q.shape
    n_kv = cfg.n_kv_heads
    q = q.reshape(b, t, n_kv, h // n_kv, dh)
    if cache is None:
      attend = lambda q, mask_bts: attention(q, k, v, mask_bts, softmax_scale(cfg))
      cache = dict(k=k, v=v)  # returned for a prompt's PrefixKV
    elif isinstance(cache, PrefixKV):
      attend = functools.partial(_gqa_prefix_attention, k_rskd=k, v_rskd=v, prefix=cache, scale=softmax_scale(cfg))
      cache = None
    else:
      cache = dict(k=write_keys_t(cache["k"], k, positions_bt), v=write_cache_heads(cache["v"], v, positions_bt))
      k_all, v_all = cache["k"].astype(dt), cache["v"].astype(dt)
      attend = lambda q, mask_bts: _cached_attention(q, k_all, v_all, mask_bts, softmax_scale(cfg))
    out = over_query_blocks(attend, q, mask, cfg.attention_chunk).reshape(b, t, h, dh)
    return project(out, self.wo[...].astype(dt), n_in=2), cache

  def init_cache(self, batch: int, length: int, dtype):
    """Keys [B, K, Dh, S] and values [B, K, S, Dh] (see _cached_attention)."""
    k, dh = self.cfg.n_kv_heads, self.cfg.head_dim
    return dict(k=jnp.zeros((batch, k, dh, length), dtype), v=jnp.zeros((batch, k, length, dh), dtype))


def _gqa_prefix_attention(q_rtkgd, mask_rts, k_rskd, v_rskd, prefix: PrefixKV, scale: float):
  """GQA of completion queries [R, T, K, G, Dh] over their group's prompt's keys and,
  causally, their own row's [R, N, K, Dh]."""
  kv, mask = with_prompt(prefix, dict(k=k_rskd, v=v_rskd), mask_rts)
  return attention(q_rtkgd, kv["k"], kv["v"], mask, scale)


def _cached_attention(q_btkgd, k_bkds, v_bksd, mask_bts, scale: float):
  """Attention of queries [B, T, K, G, Dh] over a cache: keys [B, K, Dh, S] (slots last),
  values [B, K, S, Dh]. Returns [B, T, K, G, Dh].

  Why these layouts: a decode step is bound by reading the cache, and XLA:CPU reads it
  fastest when (b, k) are the leading batch dims and both matmuls are plain [G, Dh] x
  [Dh, S] and [G, S] x [S, Dh] products per (b, k). Keys [B, S, K, Dh] made it transpose
  the whole cache of every layer at every step; keys [B, K, S, Dh] made the score matmul
  an [S, Dh] x [Dh, G] product with G = 2 columns, 2x slower than this one.
  """
  if q_btkgd.shape[1] == 1:  # decode: drop T so no operand needs a transpose
    scores = jnp.einsum("bkgd,bkds->bkgs", q_btkgd[:, 0], k_bkds, preferred_element_type=jnp.float32)
    probs = masked_softmax(scores * scale, mask_bts[:, None, :, :])  # mask [B, 1, S] -> [B, 1, 1, S]
    return jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_bksd.dtype), v_bksd)[:, None]
  scores = jnp.einsum("btkgd,bkds->bkgts", q_btkgd, k_bkds, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores * scale, mask_bts[:, None, None])
  out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v_bksd.dtype), v_bksd)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def _mla_keys(k_nope_bshk, k_rope_bsk):
  """MLA's per-head keys [B, S, H, dn + dr]: each head's no-RoPE part and the one RoPE key
  all heads share (DeepSeek-V2 eq. 17), so q . k = q_nope . k_nope + q_rope . k_rope."""
  k_rope = jnp.broadcast_to(k_rope_bsk[:, :, None, :], k_nope_bshk.shape[:3] + k_rope_bsk.shape[-1:])
  return jnp.concatenate([k_nope_bshk, k_rope], axis=-1)


def _mla_attention(qs, mask_bts, k_nope_bshk, k_rope_bsk, v_bshk, scale: float):
  """Attention of MLA's queries (q_nope [B, T, H, dn], q_rope [B, T, H, dr]) over per-head
  keys and values [B, S, H, dv] (every head its own key head: K = H, G = 1)."""
  q = jnp.concatenate(qs, axis=-1)[:, :, :, None, :]
  return attention(q, _mla_keys(k_nope_bshk, k_rope_bsk), v_bshk, mask_bts, scale)[:, :, :, 0, :]


def _mla_prefix_attention(qs, mask_rts, k_nope_rshk, k_rope_rsk, v_rshk, prefix: PrefixKV, scale: float):
  """MLA of completion queries over their group's prompt (its per-head keys and values,
  expanded once per prompt) and, causally, their own row's tokens."""
  kv, mask = with_prompt(prefix, dict(k_nope=k_nope_rshk, k_rope=k_rope_rsk, v=v_rshk), mask_rts)
  return _mla_attention(qs, mask, kv["k_nope"], kv["k_rope"], kv["v"], scale)


class MLAttention(nnx.Module):
  """Multi-head Latent Attention (DeepSeek-V2 sec. 2.1; DeepSeek-V3 sec. 2.1.1)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, std = cfg.d_model, cfg.n_heads, cfg.init_std
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    self.cfg = cfg
    if cfg.q_lora_rank:
      self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), std)
      self.q_norm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS, rngs, axis_name="q_lora")
      self.wq_b = param(rngs, (cfg.q_lora_rank, h, dn + dr), ("q_lora", "heads", "head_dim"), std)
    else:
      self.wq = param(rngs, (d, h, dn + dr), ("embed", "heads", "head_dim"), std)
    # Down-projection to the latent c_kv plus the decoupled RoPE key (shared by all heads).
    self.wkv_a = param(rngs, (d, r + dr), ("embed", "kv_lora"), std)
    self.kv_norm = RMSNorm(r, MLA_NORM_EPS, rngs, axis_name="kv_lora")
    # Up-projection of the latent to per-head no-RoPE keys and values.
    self.wkv_b = param(rngs, (r, h, dn + dv), ("kv_lora", "heads", "head_dim"), std)
    self.wo = param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), std)

  def _queries(self, x_btd, rope, dt):
    cfg = self.cfg
    if cfg.q_lora_rank:
      q_lat = self.q_norm(project(x_btd, self.wq_a[...].astype(dt)))
      q = project(q_lat, self.wq_b[...].astype(dt))
    else:
      q = project(x_btd, self.wq[...].astype(dt))
    q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    q_rope = rotate(q_rope, rope, cfg.rope_interleave)
    return q_nope, q_rope

  def _latents(self, x_btd, rope, dt):
    cfg = self.cfg
    kv = project(x_btd, self.wkv_a[...].astype(dt))
    c_kv = self.kv_norm(kv[..., :cfg.kv_lora_rank])
    k_rope = kv[..., cfg.kv_lora_rank:][:, :, None, :]  # one RoPE key shared by all heads
    k_rope = rotate(k_rope, rope, cfg.rope_interleave)
    return c_kv, k_rope[:, :, 0, :]

  def __call__(self, x_btd, positions_bt, mask: KeyMask, cache=None, rope=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    dn = cfg.qk_nope_head_dim
    scale = softmax_scale(cfg)
    rope = rope_tables(cfg, positions_bt) if rope is None else rope
    q_nope, q_rope = self._queries(x_btd, rope, dt)
    c_kv, k_rope = self._latents(x_btd, rope, dt)
    w_uk = self.wkv_b[...][..., :dn].astype(dt)  # [R, H, dn]
    w_uv = self.wkv_b[...][..., dn:].astype(dt)  # [R, H, dv]
    if cache is None:
      # Training / full forward: expand the latent into per-head keys and values.
      k_nope = project(c_kv, w_uk)
      v = project(c_kv, w_uv)

      attend = functools.partial(_mla_attention, k_nope_bshk=k_nope, k_rope_bsk=k_rope, v_bshk=v, scale=scale)
      out = over_query_blocks(attend, (q_nope, q_rope), mask, cfg.attention_chunk)
      cache = dict(k_nope=k_nope, k_rope=k_rope, v=v)  # returned for a prompt's PrefixKV
    elif isinstance(cache, PrefixKV):
      attend = functools.partial(_mla_prefix_attention, k_nope_rshk=project(c_kv, w_uk), k_rope_rsk=k_rope,
                                 v_rshk=project(c_kv, w_uv), prefix=cache, scale=scale)
      out, cache = over_query_blocks(attend, (q_nope, q_rope), mask, cfg.attention_chunk), None
    else:
      cache = dict(c_kv=write_cache(cache["c_kv"], c_kv, positions_bt),
                   k_rope=write_cache(cache["k_rope"], k_rope, positions_bt))
      c_all, kr_all = cache["c_kv"].astype(dt), cache["k_rope"].astype(dt)
      # Absorbed form: (q W_uk^T) . c_kv == q . (c_kv W_uk), without per-head keys.
      q_lat = jnp.einsum("bthk,rhk->bthr", q_nope, w_uk)

      def attend(qs, mask_bts):
        q_lat, q_rope = qs
        scores = jnp.einsum("bthr,bsr->bhts", q_lat, c_all, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthk,bsk->bhts", q_rope, kr_all, preferred_element_type=jnp.float32)
        probs = masked_softmax(scores * scale, mask_bts[:, None])
        return jnp.einsum("bhts,bsr->bthr", probs.astype(dt), c_all)
      o_lat = over_query_blocks(attend, (q_lat, q_rope), mask, cfg.attention_chunk)
      out = jnp.einsum("bthr,rhk->bthk", o_lat, w_uv)
    return project(out, self.wo[...].astype(dt), n_in=2), cache

  def init_cache(self, batch: int, length: int, dtype):
    cfg = self.cfg
    return dict(c_kv=jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                k_rope=jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype))


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs):
  return MLAttention(cfg, rngs) if cfg.attention == "mla" else GQAttention(cfg, rngs)
