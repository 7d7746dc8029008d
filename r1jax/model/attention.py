"""Attention: grouped-query attention (Llama / Qwen) and Multi-head Latent Attention (DeepSeek).

Both take a boolean mask [B, T, S] built once per forward by the decoder, and optionally a
layer cache. A cache holds one slot per position (slot s stores position s), so writing
token t of row b is a scatter at (b, positions[b, t]); continuous batching can then
reset and refill a single row.

GQA caches K and V [B, S, K, Dh]. MLA caches only what DeepSeek-V2 section 2.1.2 says is
needed: the normalised latent c_kv [B, S, R] and the shared RoPE key [B, S, Dr]; decoding
with a cache uses the absorbed form (W_uk folded into the query, W_uv applied after the
weighted sum), so the per-head keys and values are never materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.model.config import ModelConfig
from r1jax.model.layers import RMSNorm, apply_rope, dtype_of, param, rope_inv_freq, softmax_scale

# DeepSeek's reference (inference/model.py) and transformers both build MLA's q/kv latent
# norms with RMSNorm's default eps, whatever rms_norm_eps the config gives the other norms.
MLA_NORM_EPS = 1e-6
NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, not NaN


def masked_softmax(scores, mask):
  """Softmax over the last axis in fp32, masked positions set to NEG_INF."""
  scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


def write_cache(cache_bs, new_bt, positions_bt):
  """Scatters new_bt [B, T, ...] into cache_bs [B, S, ...] at slot = position."""
  rows = jnp.arange(cache_bs.shape[0])[:, None]
  return cache_bs.at[rows, positions_bt].set(new_bt.astype(cache_bs.dtype), mode="drop")


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

  def __call__(self, x_btd, positions_bt, mask_bts, cache=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    q = jnp.einsum("btd,dhk->bthk", x_btd, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_btd, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_btd, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions_bt, *rope_inv_freq(cfg), interleaved=False)
    k = apply_rope(k, positions_bt, *rope_inv_freq(cfg), interleaved=False)
    if cache is not None:
      cache = dict(k=write_cache(cache["k"], k, positions_bt), v=write_cache(cache["v"], v, positions_bt))
      k, v = cache["k"].astype(dt), cache["v"].astype(dt)
    b, t, h, dh = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = masked_softmax(scores * softmax_scale(cfg), mask_bts[:, None, None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dt), v).reshape(b, t, h, dh)
    return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt)), cache

  def init_cache(self, batch: int, length: int, dtype):
    shape = (batch, length, self.cfg.n_kv_heads, self.cfg.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


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

  def _queries(self, x_btd, positions_bt, dt):
    cfg = self.cfg
    if cfg.q_lora_rank:
      q_lat = self.q_norm(jnp.einsum("btd,dr->btr", x_btd, self.wq_a[...].astype(dt)))
      q = jnp.einsum("btr,rhk->bthk", q_lat, self.wq_b[...].astype(dt))
    else:
      q = jnp.einsum("btd,dhk->bthk", x_btd, self.wq[...].astype(dt))
    q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    q_rope = apply_rope(q_rope, positions_bt, *rope_inv_freq(cfg), cfg.rope_interleave)
    return q_nope, q_rope

  def _latents(self, x_btd, positions_bt, dt):
    cfg = self.cfg
    kv = jnp.einsum("btd,dr->btr", x_btd, self.wkv_a[...].astype(dt))
    c_kv = self.kv_norm(kv[..., :cfg.kv_lora_rank])
    k_rope = kv[..., cfg.kv_lora_rank:][:, :, None, :]  # one RoPE key shared by all heads
    k_rope = apply_rope(k_rope, positions_bt, *rope_inv_freq(cfg), cfg.rope_interleave)
    return c_kv, k_rope[:, :, 0, :]

  def __call__(self, x_btd, positions_bt, mask_bts, cache=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    dn = cfg.qk_nope_head_dim
    scale = softmax_scale(cfg)
    q_nope, q_rope = self._queries(x_btd, positions_bt, dt)
    c_kv, k_rope = self._latents(x_btd, positions_bt, dt)
    w_uk = self.wkv_b[...][..., :dn].astype(dt)  # [R, H, dn]
    w_uv = self.wkv_b[...][..., dn:].astype(dt)  # [R, H, dv]
    if cache is None:
      # Training / full forward: expand the latent into per-head keys and values.
      k_nope = jnp.einsum("bsr,rhk->bshk", c_kv, w_uk)
      v = jnp.einsum("bsr,rhk->bshk", c_kv, w_uv)
      scores = jnp.einsum("bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
      scores += jnp.einsum("bthk,bsk->bhts", q_rope, k_rope, preferred_element_type=jnp.float32)
      probs = masked_softmax(scores * scale, mask_bts[:, None])
      out = jnp.einsum("bhts,bshk->bthk", probs.astype(dt), v)
    else:
      cache = dict(c_kv=write_cache(cache["c_kv"], c_kv, positions_bt),
                   k_rope=write_cache(cache["k_rope"], k_rope, positions_bt))
      c_all, kr_all = cache["c_kv"].astype(dt), cache["k_rope"].astype(dt)
      # Absorbed form: (q W_uk^T) . c_kv == q . (c_kv W_uk), without per-head keys.
      q_lat = jnp.einsum("bthk,rhk->bthr", q_nope, w_uk)
      scores = jnp.einsum("bthr,bsr->bhts", q_lat, c_all, preferred_element_type=jnp.float32)
      scores += jnp.einsum("bthk,bsk->bhts", q_rope, kr_all, preferred_element_type=jnp.float32)
      probs = masked_softmax(scores * scale, mask_bts[:, None])
      o_lat = jnp.einsum("bhts,bsr->bthr", probs.astype(dt), c_all)
      out = jnp.einsum("bthr,rhk->bthk", o_lat, w_uv)
    return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt)), cache

  def init_cache(self, batch: int, length: int, dtype):
    cfg = self.cfg
    return dict(c_kv=jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                k_rope=jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype))


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs):
  return MLAttention(cfg, rngs) if cfg.attention == "mla" else GQAttention(cfg, rngs)
