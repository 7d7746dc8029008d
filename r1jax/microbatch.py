"""Gradient accumulation: a batch's gradient summed over forward + backward passes.

Both update steps use it: the GRPO update (`rl.microbatches`, r1jax/rl/trainer.py) and
the next-token step of pretraining, SFT and distillation (`train.microbatches`,
r1jax/sft.py). Each pass's loss divides by the *whole* batch's normaliser (token count,
row count, ...), so the passes' gradients sum to the one-pass gradient; only one pass's
activations are live at a time. The row split interleaves (see `split_rows`) so that a
row-sharded batch keeps every device busy in every pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_rows(tree, parts: int, group_size: int = 1):
  """Leaves [R, ...] -> [parts, R / parts, ...], whole groups of G rows in each part when
  R / parts divides by G (else single rows). Part j takes groups j, parts + j,
  2 parts + j, ...: interleaved, not contiguous, so that when the rows are split over
  the mesh's batch axes (contiguously, parallel.put_global_batch) every part still
  spreads over every device and a scan over the parts keeps all devices busy."""
  def split(x):
    r = x.shape[0]
    unit = group_size if (r // parts) % group_size == 0 else 1
    x = x.reshape((r // (parts * unit), parts, unit) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((parts, r // parts) + x.shape[3:])
  return jax.tree.map(split, tree)


def merge_rows(x, group_size: int = 1):
  """The inverse of split_rows for one leaf: [parts, R / parts, ...] -> [R, ...]."""
  parts, rows = x.shape[:2]
  unit = group_size if rows % group_size == 0 else 1
  x = x.reshape((parts, rows // unit, unit) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape((parts * rows,) + x.shape[3:])


def summed_gradients(grads_of, params, parts):
  """sum_j grads_of(part j)[0] over the leading axis of `parts` (split_rows' output) in a
  lax.scan with one accumulator, and the parts' aux outputs stacked [parts, ...].

  grads_of(part) -> (gradients shaped like params, aux). On a data-parallel mesh each
  part's gradient is all-reduced inside the loop (XLA does not defer a carry's
  reduction past it): k passes cost k all-reduces."""
  def accumulate(acc, part):
    grads, aux = grads_of(part)
    return jax.tree.map(jnp.add, acc, grads), aux

  return jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), parts)
