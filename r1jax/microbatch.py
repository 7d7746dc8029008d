"""Gradient accumulation: a batch's gradient summed over forward + backward passes.

Every update step uses it: the GRPO update (`rl.microbatches`, r1jax/rl/trainer.py),
the next-token step of pretraining, SFT and distillation (`train.microbatches`,
r1jax/sft.py) and the reward model's (r1jax/reward_model.py). Each pass's loss divides by
the *whole* batch's normaliser (token count, row count, pairs, ...), so the passes'
gradients sum to the one-pass gradient; only one pass's activations are live at a time.
The row split interleaves (`split_rows`) and each pass's rows are spread over the batch
shards (`spread_rows`), so a row-sharded batch keeps every device busy in every pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax import parallel


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


def spread_rows(tree):
  """Each leaf's rows [R, ...] split evenly over the batch axes of the mesh in context
  (`jax.set_mesh`; the stages trace their steps under it), over as many of them, in
  order, as R divides; unchanged without a mesh.

  Why: a part of split_rows is a strided slice of a row-sharded batch. When each device
  holds at least `parts` groups the part is already spread and this moves nothing; when
  it holds fewer (e.g. the R1-Zero preset's 16 minibatches of 2 groups on 32 chips that
  hold one group each), XLA would otherwise run the part on the few devices holding its
  rows and repeat that work on the rest. Then the rows move (a group's rows may land on
  several devices; the shared prompt's keys follow them), which costs a copy of the
  part's inputs, not of its activations."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree

  def spread(x):
    axes, shards = [], 1
    for a in parallel.BATCH_AXES:
      size = dict(mesh.shape).get(a, 1)
      if size > 1 and x.shape[0] % (shards * size) == 0:
        axes.append(a)
        shards *= size
    if not axes:
      return x
    return jax.lax.with_sharding_constraint(x, P(tuple(axes), *([None] * (x.ndim - 1))))

  return jax.tree.map(spread, tree)


def summed_gradients(grads_of, params, parts):
  """sum_j grads_of(part j)[0] over the leading axis of `parts` (split_rows' output) in a
  lax.scan with one accumulator, and the parts' aux outputs stacked [parts, ...].

  grads_of(part) -> (gradients shaped like params, aux); each part's rows are spread
  over the batch shards first (`spread_rows`). On a data-parallel mesh each
  part's gradient is all-reduced inside the loop (XLA does not defer a carry's
  reduction past it): k passes cost k all-reduces."""
  def accumulate(acc, part):
    grads, aux = grads_of(spread_rows(part))
    return jax.tree.map(jnp.add, acc, grads), aux

  return jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), parts)
