"""Continuous batching: a fixed set of decode rows ("slots"), refilled as samples finish.

Reasoning traces end at very different lengths; with plain batching every row waits for
the longest. Here S slots each hold one sample at a time, and the host keeps a queue of
work items (prompt b, sample j) in output-row order. The loop:

  1. refill: every free slot takes the next waiting sample. Prompts are prefilled P at a
     time into a small "store" (their caches and last-token logits); a sample's slot gets
     a copy of its prompt's cache row, so the G samples of a prompt share one prefill.
  2. decode: a jitted `lax.while_loop` of the shared `sampler.decode_step` runs until a
     slot frees while samples are still waiting (or until every slot is done).

Steps 1-2 repeat on the host; the state (cache, outputs) stays on device and is donated
to each call, so the cache is updated in place. Outputs are written by the decode step
straight into [R, N] buffers at (output row, step), so the result has the same order and
format as plain `generate`, and the per-row keys make it the same tokens.

When nothing is waiting and at most half the slots are still live, the live rows are
packed into half as many slots (`_shrink`), down to one: the tail of a heavy-tailed mix
then decodes on a smaller batch, which is faster (a step's cost falls with its rows),
and slot-steps count only the rows decoded. Each slot count compiles its own decode
loop once (log2(S) + 1 of them).

Shapes: S slots, P prompts per prefill, R = B*G output rows, N new tokens, C cache
length (Tp + N), V vocab.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.sampling import sampler as sampler_lib


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_store(graphdef, state, ids_pt, mask_pt, cache_len):
  """Prefills P prompts into a store of full-length cache rows."""
  model = sampler_lib.merge_model(graphdef, state)
  logits_pv, cache, lengths_p, experts = sampler_lib.prefill(model, ids_pt, mask_pt, cache_len)
  return dict(cache=cache, logits=logits_pv, start=lengths_p), experts


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "cache_len", "n_rows", "params"))
def _empty_state(graphdef, state, rng, slots, cache_len, n_rows, params):
  """S free slots and zeroed [R, N] outputs."""
  model = sampler_lib.merge_model(graphdef, state)
  vocab = model.cfg.vocab_size
  zeros = jnp.zeros((slots,), jnp.int32)
  c = dict(cache=model.init_cache(slots, cache_len), logits=jnp.zeros((slots, vocab), jnp.float32),
           live=jnp.zeros((slots,), bool), row=zeros + n_rows, t=zeros, start=zeros, budget=zeros,
           key=sampler_lib.row_keys(rng, zeros), steps=jnp.zeros((), jnp.int32),
           out=sampler_lib.init_outputs(n_rows, params.max_new_tokens, *sampler_lib.moe_shape(model)))
  stop_table = sampler_lib.make_stop_table(params.stop_sequences)
  if stop_table is not None:
    c["recent"] = jnp.full((slots, stop_table.shape[1]), -2, jnp.int32)
  return c


@functools.partial(jax.jit, donate_argnames=("c",))
def _refill(c, store, rng, dst_s, src_s, rows_s, budget_s, n):
  """Slot dst_s[i] starts output row rows_s[i] from store row src_s[i], for i < n.

  dst_s etc. are [S] (entries past n are padding: dst = S, dropped). Cache rows are
  copied whole, one dynamic_update_slice per row and leaf, so the donated cache is
  written in place and any cache layout works (only axis 0 is the batch).
  """
  slots = c["live"].shape[0]
  dst = jnp.where(jnp.arange(slots) < n, dst_s, slots)
  c = dict(c)
  c["logits"] = c["logits"].at[dst].set(store["logits"][src_s], mode="drop")
  c["start"] = c["start"].at[dst].set(store["start"][src_s], mode="drop")
  c["live"] = c["live"].at[dst].set(budget_s > 0, mode="drop")
  c["row"] = c["row"].at[dst].set(rows_s, mode="drop")
  c["t"] = c["t"].at[dst].set(0, mode="drop")
  c["budget"] = c["budget"].at[dst].set(budget_s, mode="drop")
  c["key"] = c["key"].at[dst].set(sampler_lib.row_keys(rng, rows_s), mode="drop")
  if "recent" in c:
    c["recent"] = c["recent"].at[dst].set(-2, mode="drop")

  def copy_row(i, cache):
    def one(leaf, src_leaf):
      row = jax.lax.dynamic_slice_in_dim(src_leaf, src_s[i], 1, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(leaf, row, dst_s[i], axis=0)
    return jax.tree.map(one, cache, store["cache"])

  c["cache"] = jax.lax.fori_loop(0, n, copy_row, c["cache"])
  return c


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "cache_len"), donate_argnames=("c",))
def _decode(graphdef, state, c, pending, shrink_at, params, cache_len):
  """Decodes until a slot frees while samples are waiting (pending), until at most
  shrink_at rows are live, or until all are done."""
  model = sampler_lib.merge_model(graphdef, state)
  stop_table = sampler_lib.make_stop_table(params.stop_sequences)

  def cond(c):
    n_live = jnp.sum(c["live"])
    return (n_live > 0) & ~(pending & (n_live < c["live"].shape[0])) & (n_live > shrink_at)

  return jax.lax.while_loop(cond, lambda c: sampler_lib.decode_step(model, c, params, stop_table, cache_len), c)


@jax.jit
def _shrink(c, keep_s):
  """Packs the rows keep_s [S'] (the live ones first) into a state of S' rows."""
  per_slot = {k: v for k, v in c.items() if k not in ("out", "steps")}
  packed = jax.tree.map(lambda x: x[keep_s], per_slot)
  return dict(packed, out=c["out"], steps=c["steps"])


def generate_continuous(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, budget_r, group_size,
                        params, slots: int, shrink: bool = True):
  """`sampler.generate` with continuous batching over `slots` decode rows (see module doc).

  Returns the same dict as `generate`; slot_steps sums, over decode iterations, the rows
  each iteration decoded.
  """
  b, tp = prompt_ids_bt.shape
  g, n = group_size, params.max_new_tokens
  n_rows, cache_len = b * g, tp + n
  assert slots >= 1, slots
  per_prefill = min(b, max(1, -(-slots // g)))  # enough prompts to fill every slot at start
  budget_host = np.asarray(budget_r)
  prompt_ids_bt, prompt_mask_bt = np.asarray(prompt_ids_bt), np.asarray(prompt_mask_bt)
  queue = collections.deque(int(r) for r in np.flatnonzero(budget_host > 0))
  c = _empty_state(graphdef, state, rng, slots, cache_len, n_rows, params)
  live = np.zeros((slots,), bool)
  store, store_first, prompt_experts, slot_steps = None, -1, {}, 0

  def prefill_from(first):
    ids = np.zeros((per_prefill, tp), np.int32)
    mask = np.zeros((per_prefill, tp), np.int32)
    take = min(per_prefill, b - first)
    ids[:take] = prompt_ids_bt[first:first + take]
    mask[:take] = prompt_mask_bt[first:first + take]
    new_store, experts = _prefill_store(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache_len)
    if experts is not None:
      for i in range(take):
        prompt_experts[first + i] = experts[:, i]
    return new_store

  def place(c, batch):
    """Starts the (slot, row, store row) triples of `batch` in one _refill call."""
    if not batch:
      return c
    k = len(live)
    dst, src, rows = np.full((k,), k, np.int32), np.zeros((k,), np.int32), np.zeros((k,), np.int32)
    budget = np.zeros((k,), np.int32)
    for i, (s, r, p) in enumerate(batch):
      dst[i], rows[i], src[i], budget[i] = s, r, p, budget_host[r]
      live[s] = True
    return _refill(c, store, rng, jnp.asarray(dst), jnp.asarray(src), jnp.asarray(rows),
                   jnp.asarray(budget), jnp.int32(len(batch)))

  while True:
    # Every free slot takes the next waiting sample; prompts are prefilled as needed.
    free = collections.deque(int(s) for s in np.flatnonzero(~live))
    batch = []
    while free and queue:
      p = queue[0] // g
      if store is None or not store_first <= p < store_first + per_prefill:
        c, batch = place(c, batch), []  # this store's samples go in before it is replaced
        store, store_first = prefill_from(p), p
      batch.append((free.popleft(), queue.popleft(), p - store_first))
    c = place(c, batch)
    if not live.any():
      break
    can_shrink = shrink and not queue and len(live) >= 2
    if can_shrink and live.sum() <= len(live) // 2:
      keep = np.concatenate([np.flatnonzero(live), np.flatnonzero(~live)])[:len(live) // 2]
      c = _shrink(c, jnp.asarray(keep))
      live = live[keep]
      continue
    steps_before = int(c["steps"])
    shrink_at = len(live) // 2 if can_shrink else -1
    c = _decode(graphdef, state, c, jnp.asarray(bool(queue)), jnp.int32(shrink_at), params, cache_len)
    live = np.array(c["live"])
    slot_steps += (int(c["steps"]) - steps_before) * len(live)

  out = dict(c["out"], steps=c["steps"], slot_steps=jnp.asarray(slot_steps, jnp.int32))
  out.setdefault("experts", None)
  out["prompt_experts"] = None
  if prompt_experts:
    some = next(iter(prompt_experts.values()))
    stacked = [prompt_experts.get(i, jnp.zeros_like(some)) for i in range(b)]
    out["prompt_experts"] = jnp.repeat(jnp.stack(stacked, axis=1), g, axis=1)
  return out
