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
straight into [R, N] buffers at (row, step) (on a mesh, put in output-row order at the
end), so the result has the same order and format as plain `generate`, and the per-row
keys make it the same tokens.

When nothing is waiting and at most half the slots are still live, the live rows are
packed into half as many slots (`_shrink`), down to one: the tail of a heavy-tailed mix
then decodes on a smaller batch, which is faster (a step's cost falls with its rows),
and slot-steps count only the rows decoded. Each slot count compiles its own decode
loop once (log2(S) + 1 of them).

On a mesh (`generate(slots=..., mesh=...)`) every device along the batch axes runs its
own batcher with S / shards slots, its own store and its own output buffers. The host
hands the prompts out a store at a time to whichever device runs out of waiting samples
first (not in fixed shares: a device whose samples end early takes more prompts), and
when no prompt waits, a device with free slots steals the unstarted samples of one
prompt from the device holding the most, prefilling that prompt again itself: none
idles while samples still wait (utilisation 95.9% on 2 devices against 74.5% with fixed
shares, bench/NOTES.md). Each sample's random draws follow its global output row, and
its outputs go to the next free row of its device's buffers, put back in order at the
end. The jitted calls are one SPMD program each (`jax.shard_map`, compiled once,
not once per device); inside, each device's decode loop stops on its own condition, and
the host loop reads every device's slots back after each call and refills them all in
the next. The weights are gathered whole over the batch axes once, before the loop (the
routed experts too: the batch shards never communicate inside a call); a split over
`tensor` is kept, and XLA partitions each shard's calls over that axis. Without a mesh
it is the same code on one shard.

Shapes: W shards (1 without a mesh), S slots per shard, P prompts per prefill, R = B*G
output rows, N new tokens, C cache length (Tp + N), V vocab. Arrays "per shard" are the
W shards' blocks concatenated along axis 0 (the expert records: axis 1); per-shard
scalars are [W].
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax.sampling import sampler as sampler_lib


def _per_shard(fn, mesh, in_specs, out_specs):
  """fn on every shard of the mesh's batch axes (jax.shard_map), or fn itself without
  a mesh. Specs are pytree prefixes of strings: "rows" (split over the batch axes on
  axis 0), "experts" (on axis 1: [L, rows, ...]) and "whole" (the same on every shard).
  Manual over the batch axes only: what is split over `tensor` stays split, and XLA
  partitions each shard's work over it."""
  if mesh is None:
    return fn
  axes = sampler_lib.row_axes(mesh)
  named = {"rows": P(axes), "experts": P(None, axes), "whole": P()}
  to_p = lambda specs: jax.tree.map(named.__getitem__, specs)  # noqa: E731
  return jax.shard_map(fn, mesh=mesh, in_specs=to_p(in_specs), out_specs=to_p(out_specs), axis_names=set(axes),
                       check_vma=False)


def _state_specs(c):
  """Specs of a batcher state: everything per shard; the expert records on axis 1."""
  return dict({k: "rows" for k in c if k != "out"}, out={k: "experts" if k == "experts" else "rows" for k in c["out"]})


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "mesh"))
def _prefill_store(graphdef, state, ids_pt, mask_pt, cache_len, mesh=None):
  """Prefills each shard's P prompts into its store of full-length cache rows."""
  def local(state, ids_pt, mask_pt):
    model = sampler_lib.merge_model(graphdef, state)
    logits_pv, cache, lengths_p, experts = sampler_lib.prefill(model, ids_pt, mask_pt, cache_len)
    return dict(cache=cache, logits=logits_pv, start=lengths_p), experts

  return _per_shard(local, mesh, ("whole", "rows", "rows"), ("rows", "experts"))(state, ids_pt, mask_pt)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "cache_len", "n_rows", "params", "mesh"))
def _empty_state(graphdef, state, rng, slots, cache_len, n_rows, params, mesh=None):
  """S free slots and zeroed [R, N] outputs on each shard (R: the shard's rows)."""
  def local(state, rng):
    model = sampler_lib.merge_model(graphdef, state)
    vocab = model.cfg.vocab_size
    zeros = jnp.zeros((slots,), jnp.int32)
    c = dict(cache=model.init_cache(slots, cache_len), logits=jnp.zeros((slots, vocab), jnp.float32),
             live=jnp.zeros((slots,), bool), row=zeros + n_rows, t=zeros, start=zeros, budget=zeros,
             key=sampler_lib.row_keys(rng, zeros), steps=jnp.zeros((1,), jnp.int32),
             out=sampler_lib.init_outputs(n_rows, params.max_new_tokens, *sampler_lib.moe_shape(model)))
    stop_table = sampler_lib.make_stop_table(params.stop_sequences)
    if stop_table is not None:
      c["recent"] = jnp.full((slots, stop_table.shape[1]), -2, jnp.int32)
    return c

  specs = _state_specs(jax.eval_shape(local, state, rng))  # (the shard's shapes; only the keys matter)
  return _per_shard(local, mesh, ("whole", "whole"), specs)(state, rng)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("c",))
def _refill(c, store, rng, dst_s, src_s, rows_s, keys_s, budget_s, n, mesh=None):
  """On each shard, slot dst_s[i] starts a sample from store row src_s[i], for i < n: its
  outputs go to row rows_s[i] of the shard's output buffers and its random draws follow
  its global output row keys_s[i] (so they are one device's).

  dst_s etc. are [S] per shard (entries past n are padding: dst = S, dropped); n is [1]
  per shard. Cache rows are copied whole, one dynamic_update_slice per row and leaf, so
  the donated cache is written in place and any cache layout works (only axis 0 is the
  batch).
  """
  def local(c, store, rng, dst_s, src_s, rows_s, keys_s, budget_s, n):
    n = n[0]
    slots = c["live"].shape[0]
    dst = jnp.where(jnp.arange(slots) < n, dst_s, slots)
    c = dict(c)
    c["logits"] = c["logits"].at[dst].set(store["logits"][src_s], mode="drop")
    c["start"] = c["start"].at[dst].set(store["start"][src_s], mode="drop")
    c["live"] = c["live"].at[dst].set(budget_s > 0, mode="drop")
    c["row"] = c["row"].at[dst].set(rows_s, mode="drop")
    c["t"] = c["t"].at[dst].set(0, mode="drop")
    c["budget"] = c["budget"].at[dst].set(budget_s, mode="drop")
    c["key"] = c["key"].at[dst].set(sampler_lib.row_keys(rng, keys_s), mode="drop")
    if "recent" in c:
      c["recent"] = c["recent"].at[dst].set(-2, mode="drop")

    def copy_row(i, cache):
      def one(leaf, src_leaf):
        row = jax.lax.dynamic_slice_in_dim(src_leaf, src_s[i], 1, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(leaf, row, dst_s[i], axis=0)
      return jax.tree.map(one, cache, store["cache"])

    c["cache"] = jax.lax.fori_loop(0, n, copy_row, c["cache"])
    return c

  specs = _state_specs(c)
  run = _per_shard(local, mesh, (specs, "rows", "whole") + ("rows",) * 6, specs)
  return run(c, store, rng, dst_s, src_s, rows_s, keys_s, budget_s, n)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "cache_len", "mesh"), donate_argnames=("c",))
def _decode(graphdef, state, c, pending, shrink_at, params, cache_len, mesh=None):
  """Decodes, on each shard, until one of its slots frees while its samples are waiting
  (pending [1] per shard), until at most shrink_at rows are live, or until all are done.

  Each shard stops on its own condition, with no collective inside the loop (on a pod
  that would be a cross-host round trip a step); the call returns when the last shard
  stops, and a shard that stopped early waits for it (bench/NOTES.md, session 9)."""
  def local(state, c, pending, shrink_at):
    model = sampler_lib.merge_model(graphdef, state)
    stop_table = sampler_lib.make_stop_table(params.stop_sequences)

    def cond(c):
      n_live = jnp.sum(c["live"])
      return (n_live > 0) & ~(pending[0] & (n_live < c["live"].shape[0])) & (n_live > shrink_at)

    return jax.lax.while_loop(cond, lambda c: sampler_lib.decode_step(model, c, params, stop_table, cache_len), c)

  specs = _state_specs(c)
  return _per_shard(local, mesh, ("whole", specs, "rows", "whole"), specs)(state, c, pending, shrink_at)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _shrink(c, keep_s, mesh=None):
  """Packs each shard's slots keep_s [S'] (the live ones first) into a state of S' slots."""
  def local(c, keep_s):
    per_slot = {k: v for k, v in c.items() if k not in ("out", "steps")}
    packed = jax.tree.map(lambda x: x[keep_s], per_slot)
    return dict(packed, out=c["out"], steps=c["steps"])

  specs = _state_specs(c)
  return _per_shard(local, mesh, (specs, "rows"), specs)(c, keep_s)


def _replicated(state, mesh):
  """The state whole over the mesh's batch axes (gathered once for the whole loop); a
  split over any other axis (tensor) is kept."""
  if mesh is None:
    return state
  rows = set(sampler_lib.row_axes(mesh))

  def whole_over_rows(x):
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
    kept = [tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a not in rows) or None if e else None
            for e in spec]
    return NamedSharding(mesh, P(*kept))

  return jax.jit(lambda s: s, out_shardings=jax.tree.map(whole_over_rows, state))(state)


def _host(x):
  """Numpy copy of a (possibly multi-process) array: every process reads every shard."""
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  return parallel.to_host(x)


def slots_per_shard(slots: int, shards: int) -> int:
  """Decode rows each batcher of a mesh keeps: ceil(slots / shards), at least 1."""
  return max(1, -(-slots // shards))


def prompts_per_prefill(slots: int, group_size: int, n_prompts: int) -> int:
  """Prompts a batcher of `slots` rows prefills at a time (its prompt store): enough to
  fill every slot at the start, at most the n_prompts there are."""
  return min(n_prompts, max(1, -(-slots // group_size)))


def generate_continuous(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, budget_r, group_size,
                        params, slots: int, shrink: bool = True, mesh=None):
  """`sampler.generate` with continuous batching over `slots` decode rows (see module
  doc); on a mesh, ceil(slots / W) rows on each of the W devices of its batch axes.

  Returns the same dict as `generate`; slot_steps sums, over decode iterations, the rows
  each iteration decoded (on every shard).
  """
  b, tp = prompt_ids_bt.shape
  g, n = group_size, params.max_new_tokens
  w = 1
  if mesh is not None:
    w = int(np.prod([mesh.shape[a] for a in sampler_lib.row_axes(mesh)]))
  assert slots >= 1, slots
  n_rows, cache_len, slots = b * g, tp + n, slots_per_shard(slots, w)
  # A shard's output buffers hold the samples it ran, in the order it started them; at
  # most twice an even share (it takes no more prompts when full: the others have room).
  cap = n_rows if w == 1 else min(n_rows, 2 * -(-n_rows // w))
  per_prefill = prompts_per_prefill(slots, g, b)
  budget_host = np.asarray(budget_r)
  ids_host, mask_host = np.asarray(prompt_ids_bt), np.asarray(prompt_mask_bt)
  # Prompts are handed out per_prefill at a time to whichever shard runs out of work
  # first, and a shard with nothing left takes unstarted samples from another: no shard
  # idles while samples still wait.
  queue = collections.deque(p for p in range(b) if (budget_host[p * g:(p + 1) * g] > 0).any())
  pending = [collections.deque() for _ in range(w)]  # a shard's samples not started yet
  store_prompts = [[] for _ in range(w)]  # the prompts in each shard's store, in store order
  used = [0] * w  # output rows each shard has started
  where_row = np.full((n_rows,), -1, np.int64)  # global row -> shard * cap + its output row
  state = _replicated(state, mesh)
  c = _empty_state(graphdef, state, rng, slots, cache_len, cap, params, mesh)
  live = np.zeros((w, slots), bool)
  store, prompt_experts, slot_steps = None, {}, 0
  steps = np.zeros((w,), np.int32)  # decode iterations each shard has run (host copy of c["steps"])

  def prefill():
    """Every shard prefills the prompts of its store (a shard without new ones, its old ones)."""
    ids = np.zeros((w, per_prefill, tp), np.int32)
    mask = np.zeros((w, per_prefill, tp), np.int32)
    for i, prompts in enumerate(store_prompts):
      ids[i, :len(prompts)], mask[i, :len(prompts)] = ids_host[prompts], mask_host[prompts]
    new_store, experts = _prefill_store(graphdef, state, jnp.asarray(ids.reshape(w * per_prefill, tp)),
                                        jnp.asarray(mask.reshape(w * per_prefill, tp)), cache_len, mesh)
    if experts is not None:
      experts = _host(experts)
      for i, prompts in enumerate(store_prompts):
        for j, p in enumerate(prompts):
          prompt_experts[p] = experts[:, i * per_prefill + j]
    return new_store

  def place(c, batches):
    """Starts each shard's (slot, global row, store row) triples in one _refill call."""
    if not any(batches):
      return c
    dst = np.full((w, slots), slots, np.int32)
    src, rows, keys, budget = (np.zeros((w, slots), np.int32) for _ in range(4))
    for i, batch in enumerate(batches):
      for j, (slot, r, p) in enumerate(batch):
        dst[i, j], rows[i, j], keys[i, j], src[i, j], budget[i, j] = slot, used[i], r, p, budget_host[r]
        where_row[r] = i * cap + used[i]
        used[i] += 1
        live[i, slot] = True
    counts = np.array([len(batch) for batch in batches], np.int32)
    flat = lambda x: jnp.asarray(x.reshape(-1))  # noqa: E731
    return _refill(c, store, rng, flat(dst), flat(src), flat(rows), flat(keys), flat(budget), jnp.asarray(counts),
                   mesh)

  def can_take(i):
    """Whether shard i could start more work: prompts wait, or another shard holds
    samples it has not started, and a prompt's samples fit i's output buffers."""
    return used[i] + len(pending[i]) + g <= cap and (bool(queue) or any(pending[j] for j in range(w) if j != i))

  def take_work(i):
    """Gives shard i up to per_prefill waiting prompts, or when none wait, the unstarted
    samples of one prompt from the shard holding the most (work stealing: i prefills
    that prompt again into its own store). Returns whether it got any."""
    taken = []
    while queue and len(taken) < per_prefill:
      taken.append(queue.popleft())
      pending[i].extend(r for r in range(taken[-1] * g, (taken[-1] + 1) * g) if budget_host[r] > 0)
    if not taken:
      j = max(range(w), key=lambda j: len(pending[j]) if j != i else -1)
      if not pending[j]:
        return False
      p = pending[j][-1] // g
      pending[i].extend(r for r in pending[j] if r // g == p)
      pending[j] = collections.deque(r for r in pending[j] if r // g != p)
      taken = [p]
    store_prompts[i] = taken
    return True

  while True:
    # Every free slot takes its shard's next waiting sample; a shard with free slots and
    # none waiting takes new prompts (a new store) once this round is placed.
    while True:
      batches, needs = [[] for _ in range(w)], [False] * w
      for i in range(w):
        free = collections.deque(int(s) for s in np.flatnonzero(~live[i]))
        while free and pending[i]:
          r = pending[i].popleft()
          batches[i].append((free.popleft(), r, store_prompts[i].index(r // g)))
        needs[i] = bool(free) and not pending[i] and can_take(i)
      c = place(c, batches)
      if not any(needs) or not any([take_work(i) for i in range(w) if needs[i]]):
        break
      store = prefill()
    if not live.any():
      break
    waiting = [bool(pending[i]) or can_take(i) for i in range(w)]
    can_shrink = shrink and not any(pending) and not queue and slots >= 2
    if can_shrink and (live.sum(axis=1) <= slots // 2).all():
      keep = np.stack([np.concatenate([np.flatnonzero(row), np.flatnonzero(~row)])[:slots // 2] for row in live])
      c = _shrink(c, jnp.asarray(keep.reshape(-1)), mesh)
      live = np.take_along_axis(live, keep, axis=1)
      slots = slots // 2
      continue
    shrink_at = slots // 2 if can_shrink else -1
    c = _decode(graphdef, state, c, jnp.asarray(waiting), jnp.int32(shrink_at), params, cache_len, mesh)
    # One read of both per call (on several hosts each read is a collective); only a
    # decode changes the step counters.
    live, new_steps = (np.array(x) for x in _host((c["live"], c["steps"])))
    live = live.reshape(w, slots)
    slot_steps += int((new_steps - steps).sum()) * slots
    steps = new_steps

  # Rows never started (budget 0) read a zero row.
  out = _finish(c["out"], c["steps"], jnp.asarray(np.maximum(where_row, 0).astype(np.int32)),
                jnp.asarray(where_row >= 0))
  out["slot_steps"] = jnp.asarray(slot_steps, jnp.int32)
  out.setdefault("experts", None)
  out["prompt_experts"] = None
  if prompt_experts:
    some = next(iter(prompt_experts.values()))
    stacked = [prompt_experts.get(i, np.zeros_like(some)) for i in range(b)]
    out["prompt_experts"] = jnp.repeat(jnp.asarray(np.stack(stacked, axis=1)), g, axis=1)
  return out


@jax.jit
def _finish(out, steps, rows_r, started_r):
  """The outputs in global row order: row r is row rows_r[r] of the shards' concatenated
  buffers (zeros where started_r is false); steps: the most decode iterations any shard ran."""
  def take(x, axis):
    got = jnp.take(x, rows_r, axis=axis)
    mask = started_r.reshape((1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1))
    return jnp.where(mask, got, 0)

  out = {k: take(v, 1 if k == "experts" else 0) for k, v in out.items()}
  return dict(out, steps=jnp.max(steps))
