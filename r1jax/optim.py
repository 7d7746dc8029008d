"""Optimizer: AdamW with warmup + decay, global-norm clipping. fp32 state (DESIGN.md)."""

from __future__ import annotations

import optax


def learning_rate(optim_config, total_steps: int):
  """Linear warmup, then cosine / linear decay to lr * min_lr_ratio, or constant."""
  c = optim_config
  warmup = min(int(c.warmup_steps), max(total_steps - 1, 0))
  if c.schedule == "constant":
    decay = optax.constant_schedule(c.lr)
  elif c.schedule == "linear":
    decay = optax.linear_schedule(c.lr, c.lr * c.min_lr_ratio, max(total_steps - warmup, 1))
  else:
    decay = optax.cosine_decay_schedule(c.lr, max(total_steps - warmup, 1), alpha=c.min_lr_ratio)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  c = optim_config
  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  parts.append(optax.adamw(learning_rate(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                           weight_decay=c.weight_decay))
  return optax.chain(*parts)
