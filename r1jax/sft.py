"""Next-token training: pretraining, cold-start SFT and distillation share one loss.

A batch is a dict of [B, T] arrays: `tokens`, `loss_mask` (1 where the token is a target:
every real token for pretraining, only completion tokens for SFT), `segment_ids` (0 =
padding; packed rows number their examples 1, 2, ...) and `positions`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from r1jax import state as state_lib
from r1jax.model.transformer import token_logprobs


def next_token_mask(batch, shift: int = 1):
  """Targets tokens[:, shift:] from positions [:, :-shift], within one segment only."""
  seg = batch["segment_ids"]
  same = (seg[:, shift:] == seg[:, :-shift]) & (seg[:, shift:] > 0)
  return batch["loss_mask"][:, shift:].astype(jnp.float32) * same


def lm_loss(model, batch, mtp_weight: float = 0.0):
  """Mean negative log-likelihood over target tokens (+ weighted MTP loss, DeepSeek-V3 eq. 25)."""
  tokens = batch["tokens"]
  logits, aux = model(tokens, batch["positions"], batch["segment_ids"])
  mask = next_token_mask(batch)
  logp = token_logprobs(logits[:, :-1], tokens[:, 1:])
  n = jnp.maximum(mask.sum(), 1.0)
  loss = -(logp * mask).sum() / n
  metrics = dict(nll=loss, tokens=mask.sum())
  if "mtp_logits" in aux and mtp_weight:
    mtp_losses = []
    for j in range(aux["mtp_logits"].shape[0]):
      shift = j + 2
      m = next_token_mask(batch, shift)
      lp = token_logprobs(aux["mtp_logits"][j][:, :-shift], tokens[:, shift:])
      mtp_losses.append(-(lp * m).sum() / jnp.maximum(m.sum(), 1.0))
    mtp = jnp.mean(jnp.stack(mtp_losses))
    metrics["mtp_nll"] = mtp
    loss = loss + mtp_weight * mtp
  return loss, (metrics, aux.get("experts"))


def make_step(graphdef, tx, mtp_weight: float = 0.0, bias_rate: float = 0.0):
  """The pure step: loss, gradients, optimizer, then the non-gradient MoE bias nudge."""

  def step(state: state_lib.TrainState, batch):
    def loss_fn(params):
      model = state_lib.merge(graphdef, params, state.other)
      return lm_loss(model, batch, mtp_weight)

    (loss, (metrics, experts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, opt_metrics = state_lib.apply_gradients(state, grads, tx, loss)
    other, moe_metrics = state_lib.update_router_bias(
        graphdef, new_state.params, new_state.other, experts, batch["segment_ids"] > 0, bias_rate)
    new_state = new_state.replace(other=other)
    return new_state, dict(loss=loss, **metrics, **opt_metrics, **moe_metrics)

  return step


@functools.partial(jax.jit, static_argnums=(0,))
def eval_loss(graphdef, params, other, batch):
  model = state_lib.merge(graphdef, params, other)
  return lm_loss(model, batch)[0]
