"""Token choice: temperature, top-k, top-p (nucleus), greedy; and stop-sequence matching.

The log-probability returned is log pi(token) of the temperature-scaled, *unfiltered*
policy: that is what the trainer's forward computes, so rollout log-probs can serve as
the GRPO "old" log-probs without a second forward (top-k / top-p only change which
tokens may be drawn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def filter_logits(logits_bv, top_k: int, top_p: float):
  """Masks (to NEG_INF) tokens outside the top-k and outside the top-p nucleus."""
  if top_k and top_k < logits_bv.shape[-1]:
    kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
    logits_bv = jnp.where(logits_bv < kth, NEG_INF, logits_bv)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_bv, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a token while the mass strictly before it is < p: the smallest set reaching p.
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold, NEG_INF, logits_bv)
  return logits_bv


def sample(key, logits_bv, temperature: float, top_k: int, top_p: float, greedy: bool):
  """(token [B] int32, log pi(token) [B] fp32 at this temperature)."""
  logits_bv = logits_bv.astype(jnp.float32)
  scaled = logits_bv / (temperature if temperature > 0 else 1.0)
  logp_bv = jax.nn.log_softmax(scaled, axis=-1)
  if greedy or temperature <= 0:
    token = jnp.argmax(logits_bv, axis=-1)
  else:
    token = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp_bv, token[:, None], axis=-1)[:, 0]


def ends_with_any(tokens_bn, i, stop_table_sm):
  """[B] bool: tokens[:, :i+1] ends with one of the stop sequences (-1 = wildcard)."""
  m = stop_table_sm.shape[1]
  idx = i - (m - 1) + jnp.arange(m)  # the last m generated positions
  window = jnp.where(idx[None, :] >= 0, tokens_bn[:, jnp.clip(idx, 0)], -2)  # [B, m]
  match = (stop_table_sm[None] == -1) | (window[:, None, :] == stop_table_sm[None])
  return jnp.any(jnp.all(match, axis=-1), axis=-1)
