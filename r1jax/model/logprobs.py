"""Per-token log-probs from final hidden states, a block of tokens at a time (model.logits_chunk).

The vocabulary projection is the largest activation of a long-sequence forward: [B, T, V]
fp32 logits (e.g. 8 x 4096 x 152k x 4 B = 20 GB for Qwen2.5), and plain autodiff keeps
them (and the softmax) for the backward pass. Only log p(target) [B, T] (and, for the
GRPO metrics, the entropy) is needed, so `token_logprobs_from_hidden` splits T into
blocks of `chunk` tokens and runs them one after another (lax.map) with each block under
jax.checkpoint: the forward keeps one block's [B, chunk, V] at a time, and the backward
reruns the block's projection instead of storing it. Cost: one more head matmul in the
backward pass (the same recompute trade as model.remat). Values and gradients equal the
whole-sequence computation (tests/test_logits_chunk.py).

Shapes: B batch, T tokens, D model, V vocab, C tokens per block, K blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _block_logprobs(head_fn, h_btd, targets_bt, temperature: float, with_entropy: bool):
  """log p(target) [B, T] fp32 (and entropy [B, T]) of one block, logits materialised."""
  logp_btv = jax.nn.log_softmax(head_fn(h_btd).astype(jnp.float32) / temperature, axis=-1)
  logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return logp_bt
  return logp_bt, -(jnp.exp(logp_btv) * logp_btv).sum(-1)


def token_logprobs_from_hidden(head_fn, h_btd, targets_bt, chunk: int, temperature: float = 1.0,
                               with_entropy: bool = False):
  """log_softmax(head_fn(h) / temperature)[target] [B, T] fp32, and with_entropy the
  entropy -(p * log p).sum(-1) [B, T] as a second value.

  head_fn: [B, C, D] -> [B, C, V] logits (e.g. Transformer.head; it may close over the
  model's parameters, whose gradients then flow as for an unchunked call).
  chunk: tokens per block; 0 or >= T computes the whole [B, T, V] at once (the reference).
  """
  b, t, d = h_btd.shape
  if chunk <= 0 or chunk >= t:
    return _block_logprobs(head_fn, h_btd, targets_bt, temperature, with_entropy)
  k = -(-t // chunk)
  pad = k * chunk - t
  # Padded positions see zero hidden states and target 0; they are cut off below, so no
  # cotangent reaches them.
  h_kbcd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, k, chunk, d).swapaxes(0, 1)
  targets_kbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, k, chunk).swapaxes(0, 1)
  # jax.checkpoint: lax.map's backward would otherwise keep every block's logits (the
  # whole [B, T, V] again, stacked); this way it keeps only each block's inputs.
  body = jax.checkpoint(lambda xs: _block_logprobs(head_fn, xs[0], xs[1], temperature, with_entropy))
  out = jax.lax.map(body, (h_kbcd, targets_kbc))

  def unblock(x_kbc):
    return x_kbc.swapaxes(0, 1).reshape(b, k * chunk)[:, :t]
  return jax.tree.map(unblock, out)
