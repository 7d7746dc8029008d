"""Token choice: temperature, top-k, top-p (nucleus), greedy; and stop-sequence matching.

The log-probability returned is log pi(token) of the temperature-scaled, *unfiltered*
policy: that is what the trainer's forward computes, so rollout log-probs can serve as
the GRPO "old" log-probs without a second forward (top-k / top-p only change which
tokens may be drawn).

`sample_rows` draws each row with its own key. The sampler derives that key from the
sample's output row and its step, never from the batch slot it happens to run in, so
plain and continuous batching draw the same tokens from the same key.
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


def sample_rows(keys_b, logits_bv, temperature: float, top_k: int, top_p: float, greedy: bool):
  """`sample` with one key per row (keys_b [B] typed keys): row b's token depends only on
  keys_b[b] and logits_bv[b].

  Draws by inverting the CDF with one uniform per row, not with Gumbel noise per logit:
  the same distribution for B uniforms instead of B*V (threefry on CPU and the two logs
  per logit were ~9% of a small model's decode step).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  scaled = logits_bv / (temperature if temperature > 0 else 1.0)
  if greedy or temperature <= 0:
    token = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logp_bv = jax.nn.log_softmax(scaled, axis=-1)
    return token, jnp.take_along_axis(logp_bv, token[:, None], axis=-1)[:, 0]
  filtered = filter_logits(scaled, top_k, top_p)
  top = jnp.max(filtered, axis=-1, keepdims=True)
  cdf_bv = cumsum_last(jnp.exp(filtered - top))  # unnormalised; filtered-out tokens add 0
  total_b1 = cdf_bv[:, -1:]
  u_b1 = jax.vmap(jax.random.uniform)(keys_b)[:, None]
  # The first token whose CDF exceeds u * total (u < 1, so one always does).
  token = jnp.minimum(jnp.sum(cdf_bv <= u_b1 * total_b1, axis=-1), logits_bv.shape[-1] - 1)
  token = token.astype(jnp.int32)
  if filtered is scaled:  # no top-k / top-p: reuse the sum for the log-probs
    logp_b = jnp.take_along_axis(scaled - top, token[:, None], axis=-1)[:, 0] - jnp.log(total_b1[:, 0])
  else:
    logp_b = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp_b


def cumsum_last(x_bv, block: int = 16):
  """Inclusive cumsum over the last axis, blocked: a [block, block] triangular matmul
  within blocks plus a cumsum of the block totals (XLA:CPU's cumsum over V=512 took
  ~2x longer). Exact in fp32 up to summation order."""
  b, v = x_bv.shape
  pad = -v % block
  x = jnp.pad(x_bv, ((0, 0), (0, pad))).reshape(b, -1, block)
  upper = jnp.triu(jnp.ones((block, block), x.dtype))  # upper[i, j] = 1 for i <= j
  within = jnp.einsum("bni,ij->bnj", x, upper, precision=jax.lax.Precision.HIGHEST)
  before = jnp.cumsum(within[..., -1], axis=-1) - within[..., -1]
  return (within + before[..., None]).reshape(b, -1)[:, :v]


def window_ends_with_any(recent_bm, stop_table_sm):
  """[B] bool: the last M tokens recent_bm [B, M] (oldest first; -2 before the first
  token) end with one of the right-aligned stop sequences (-1 = wildcard)."""
  match = (stop_table_sm[None] == -1) | (recent_bm[:, None, :] == stop_table_sm[None])
  return jnp.any(jnp.all(match, axis=-1), axis=-1)
