"""Group rollouts inside JAX, with the trainer's own model (one code path, DESIGN.md).

`generate` prefills each prompt once, copies its cache to the G samples of its group,
then decodes in a jitted `lax.while_loop` that stops as soon as every sequence has
finished. Prompts are left-padded to one length; each row keeps its own positions, and
cache slot s holds position s, so rows of different prompt lengths decode side by side.

With `cache_segments=K` (SamplingParams) plain batching runs K loops over a cache that
grows between them (prompt + the segment's last step), so early steps do not read the
empty tail of the cache: a decode step is bound by reading the cache on CPU, and with
K = 4 the issue's workload ran 11-18% faster, same tokens (the trainer's default, 4).

With `slots=S` it batches continuously instead (`r1jax.sampling.continuous`): S cache
rows, a queue of samples, and a finished row is refilled with the next waiting sample
instead of idling until the longest one ends. Both run the same `decode_step`, and a
sample's random draws depend on its output row and step only, so the two agree token
for token on the same key.

Shapes: B prompts, G group size, R = B*G output rows, S decode rows (slots), N =
max_new_tokens, Tp prompt length, V vocab, L number of MoE layers, k top-k, M longest
stop sequence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from r1jax.sampling import filters


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  greedy: bool = False
  eos_ids: tuple[int, ...] = ()
  # Stop sequences as token-id tuples (e.g. the ids of "</answer>"); the stop tokens are
  # kept in the completion and the mask ends with them.
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  # Plain batching decodes in this many segments, each over a cache just long enough for
  # it (prompt + the segment's last step), so early steps do not attend over empty
  # slots. Each segment compiles its own decode loop.
  cache_segments: int = 1


def prompt_positions(prompt_mask_bt, pad_slot: int):
  """Positions 0..L-1 of the real (right-aligned) prompt tokens; padding goes to a slot
  past the cache end, so its writes are dropped."""
  pos = jnp.cumsum(prompt_mask_bt, axis=1) - 1
  return jnp.where(prompt_mask_bt > 0, pos, pad_slot).astype(jnp.int32)


def make_stop_table(stop_sequences):
  """[n_stop, M] right-aligned ids, -1 where shorter (a wildcard)."""
  if not stop_sequences:
    return None
  m = max(len(s) for s in stop_sequences)
  table = np.full((len(stop_sequences), m), -1, np.int32)
  for i, s in enumerate(stop_sequences):
    table[i, m - len(s):] = s
  return jnp.asarray(table)


def as_typed_key(rng):
  """A typed PRNG key, whether `rng` is one already or a raw uint32 PRNGKey."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def merge_model(graphdef, state):
  return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def prefill(model, prompt_ids_bt, prompt_mask_bt, cache_len: int, forced_experts=None):
  """Runs the prompts into a fresh cache of cache_len slots.

  Returns (logits_bv of the last prompt token, cache, prompt lengths [B], prompt experts
  [L, B, Tp, k] or None). Left padding: the last column is the last real token.
  """
  b, _ = prompt_ids_bt.shape
  pos_bt = prompt_positions(prompt_mask_bt, cache_len)
  h_btd, aux = model(prompt_ids_bt, pos_bt, prompt_mask_bt, cache=model.init_cache(b, cache_len),
                     forced_experts=forced_experts, return_hidden=True)
  lengths_b = prompt_mask_bt.sum(axis=1).astype(jnp.int32)
  # Only the last position's logits are used: no [B, Tp, V] projection.
  return model.head(h_btd[:, -1:])[:, 0], aux["cache"], lengths_b, aux["experts"]


# --- The decode state and one decode step, shared by plain and continuous batching ----


def init_outputs(n_rows: int, n: int, n_moe: int, top_k: int):
  """Zeroed output buffers for R rows of N tokens."""
  out = dict(tokens=jnp.zeros((n_rows, n), jnp.int32), logprobs=jnp.zeros((n_rows, n), jnp.float32),
             mask=jnp.zeros((n_rows, n), jnp.int32))
  if n_moe:
    out["experts"] = jnp.zeros((n_moe, n_rows, n, top_k), jnp.int32)
  return out


def row_keys(rng, rows_s):
  """[S] keys, one per output row: fold_in(rng, row)."""
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(rows_s)


def decode_step(model, c, params: SamplingParams, stop_table, cache_len: int):
  """Samples one token for every live row, records it, and feeds it through the model.

  c: dict with cache; logits [S, V] (next-token logits of each row); live [S] bool;
  row [S] (output row; rows >= R are never written); t [S] (tokens generated so far);
  start [S] (prompt length = position of the first generated token); budget [S] (the
  row stops after this many tokens); key [S] (the row's key; step t draws with
  fold_in(key, t)); recent [S, M] last tokens (with stop sequences); out (see
  init_outputs); steps (decode iterations run).
  A row that finishes this step (EOS, stop sequence, budget) is still fed, so its last
  token's experts are recorded for routing replay; rows not live feed a dropped write.
  """
  live, row, t = c["live"], c["row"], c["t"]
  keys = jax.vmap(jax.random.fold_in)(c["key"], t)
  token, logp = filters.sample_rows(keys, c["logits"], params.temperature, params.top_k,
                                    params.top_p, params.greedy)
  token = jnp.where(live, token, 0)
  n_rows = c["out"]["tokens"].shape[0]
  r = jnp.where(live, row, n_rows)  # out of range: the write is dropped
  out = dict(c["out"])
  out["tokens"] = out["tokens"].at[r, t].set(token, mode="drop")
  out["logprobs"] = out["logprobs"].at[r, t].set(logp, mode="drop")
  out["mask"] = out["mask"].at[r, t].set(1, mode="drop")
  finished = t + 1 >= c["budget"]
  if params.eos_ids:
    finished |= jnp.any(token[:, None] == jnp.asarray(params.eos_ids, jnp.int32)[None, :], axis=-1)
  new = dict(c)
  if stop_table is not None:
    recent = jnp.concatenate([c["recent"][:, 1:], token[:, None]], axis=1)
    finished |= filters.window_ends_with_any(recent, stop_table)
    new["recent"] = recent
  pos = jnp.where(live, c["start"] + t, cache_len)[:, None]
  logits, aux = model(token[:, None], pos, live[:, None].astype(jnp.int32), cache=c["cache"])
  if "experts" in out:
    out["experts"] = out["experts"].at[:, r, t].set(aux["experts"][:, :, 0], mode="drop")
  new.update(cache=aux["cache"], logits=logits[:, 0], live=live & ~finished,
             t=t + live.astype(jnp.int32), out=out, steps=c["steps"] + 1)
  return new


def moe_shape(model):
  """(number of MoE layers, top-k); (0, 0) for a dense model."""
  n_moe = len(model.moe_layers)
  return n_moe, (model.cfg.top_k if n_moe else 0)


# --- Plain batching: all R rows decode together, one jitted call ----------------------


def _generate_rows(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, budget_r, group_size, params,
                   first_row=0, sync_axes=()):
  """Plain batching of B prompts (output rows first_row + [0, B*G) for the keys).

  sync_axes: mesh axes whose devices exchange data inside a decode step (expert
  parallelism): they must all run the same number of steps, so they stop together,
  when no row on any of them is live."""
  model = merge_model(graphdef, state)
  b, tp = prompt_ids_bt.shape
  n, g = params.max_new_tokens, group_size
  ends = segment_ends(n, params.cache_segments)  # the cache grows segment by segment
  # Prefill: once per prompt (not G times), then share the cache with the group.
  logits_bv, cache, lengths_b, prompt_experts = prefill(model, prompt_ids_bt, prompt_mask_bt, tp + ends[0])
  repeat = lambda x: jnp.repeat(x, g, axis=0)
  if prompt_experts is not None:
    prompt_experts = jnp.repeat(prompt_experts, g, axis=1)
  n_rows = b * g
  rows = jnp.arange(n_rows, dtype=jnp.int32)
  stop_table = make_stop_table(params.stop_sequences)
  c = dict(cache=jax.tree.map(repeat, cache), logits=repeat(logits_bv), live=budget_r > 0, row=rows,
           t=jnp.zeros((n_rows,), jnp.int32), start=repeat(lengths_b), budget=budget_r,
           key=row_keys(rng, first_row + rows), out=init_outputs(n_rows, n, *moe_shape(model)),
           steps=jnp.zeros((), jnp.int32))
  if stop_table is not None:
    c["recent"] = jnp.full((n_rows, stop_table.shape[1]), -2, jnp.int32)

  for i, end in enumerate(ends):
    length = tp + end
    if i:
      c["cache"] = grow_cache(model, c["cache"], n_rows, tp + ends[i - 1], length)
    cond = lambda c, end=end: (c["steps"] < end) & _any_live(c["live"], sync_axes)
    c = jax.lax.while_loop(cond, lambda c, length=length: decode_step(model, c, params, stop_table, length), c)
  out = dict(c["out"], steps=c["steps"], prompt_experts=prompt_experts, slot_steps=c["steps"] * n_rows)
  out.setdefault("experts", None)
  return out


_generate = jax.jit(_generate_rows, static_argnames=("graphdef", "group_size", "params"))


def _any_live(live, sync_axes):
  if not sync_axes:
    return jnp.any(live)
  return jax.lax.psum(jnp.any(live).astype(jnp.int32), sync_axes) > 0


def segment_ends(n: int, segments: int) -> list[int]:
  """Last step (exclusive) of each decode segment: n split as evenly as possible."""
  segments = max(1, min(segments, n))
  return [round(n * (i + 1) / segments) for i in range(segments)]


def grow_cache(model, cache, batch: int, old_len: int, new_len: int):
  """The cache with new_len > old_len slots: the old slots kept, the new ones zero. The
  slot axis of each array is the one whose size follows the length (init_cache shapes)."""
  old = jax.eval_shape(lambda: model.init_cache(batch, old_len))
  new = jax.eval_shape(lambda: model.init_cache(batch, new_len))

  def one(x, s_old, s_new):
    pads = [(0, q - p) for p, q in zip(s_old.shape, s_new.shape)]
    return jnp.pad(x, pads) if any(hi for _, hi in pads) else x

  return jax.tree.map(one, cache, old, new)


def row_axes(mesh):
  """The mesh axes decode rows split over: the batch axes (`parallel.BATCH_AXES`) > 1."""
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  return tuple(a for a in parallel.BATCH_AXES if mesh.shape.get(a, 1) > 1)


def expert_parallel_specs(state, mesh):
  """(in_specs for the model state, ep): the routed experts split over the mesh's
  `expert` axis (logical axis "experts"), everything else whole on every device; ep = 1
  (all P()) when the mesh has no expert axis > 1 or the model has no routed experts."""
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  ep = mesh.shape.get("expert", 1)
  if ep == 1:
    return P(), 1
  specs = jax.tree.map(lambda s: s.spec, parallel.state_shardings(state, mesh, rules=(("experts", "expert"),)),
                       is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  split = any(a is not None for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) for a in s)
  return (specs, ep) if split else (P(), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "params", "mesh"))
def _generate_sharded(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, budget_r, group_size, params, mesh):
  """Plain batching over the mesh: each shard of the batch axes samples its share of the
  prompts, all of their G rows. The weights are gathered whole over the batch axes
  once, on entry, except the routed experts of an MoE model, which stay split over the
  `expert` axis when the mesh has one (expert-parallel decode, `r1jax.model.cached_moe`).
  The shard_map is manual over the batch axes only: weights split over `tensor` stay
  split, and XLA partitions each shard's decode over that axis (tensor-parallel
  attention heads and FFN width, as in training). Without experts split and with
  tensor 1 the devices never communicate. The keys follow the global output row, so the
  result equals one device's."""
  axes = row_axes(mesh)
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  b = prompt_ids_bt.shape[0]
  pad = -b % n_shards
  if pad:  # copies of the last prompt; the keys follow the output row, so rows < B*G are unchanged
    prompt_ids_bt, prompt_mask_bt = (jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
                                     for a in (prompt_ids_bt, prompt_mask_bt))
    # A budget of 0: the padding rows are never live, so they add no decode steps.
    budget_r = jnp.concatenate([budget_r, jnp.zeros((pad * group_size,), budget_r.dtype)])
  rows_per_shard = (b + pad) // n_shards * group_size
  split = P(axes)
  state_specs, ep = expert_parallel_specs(state, mesh)

  def local(state, ids, mask, rng, budget):
    first_row = jax.lax.axis_index(axes) * rows_per_shard
    out = _generate_rows(graphdef, state, ids, mask, rng, budget, group_size, params, first_row,
                         sync_axes=("expert",) if ep > 1 else ())
    # Per-shard counts, gathered as [n_shards] below.
    out["steps"], out["slot_steps"] = out["steps"][None], out["slot_steps"][None]
    return out

  specs = dict(tokens=split, logprobs=split, mask=split, steps=split, slot_steps=split,
               prompt_experts=P(None, axes), experts=P(None, axes))
  out = jax.shard_map(local, mesh=mesh, in_specs=(state_specs, split, split, P(), split), out_specs=specs,
                      axis_names=set(axes), check_vma=False)(state, prompt_ids_bt, prompt_mask_bt, rng, budget_r)
  n_rows = b * group_size  # the padding's rows dropped (row axis 0, or 1 for the expert records)
  out.update({k: out[k][:n_rows] for k in ("tokens", "logprobs", "mask")})
  out.update({k: out[k][:, :n_rows] for k in ("experts", "prompt_experts") if out.get(k) is not None})
  return dict(out, steps=jnp.max(out["steps"]), slot_steps=jnp.sum(out["slot_steps"]))


def row_budgets(max_tokens_per_row, n_rows: int, n: int):
  """[R] int32: min(max_new_tokens, the row's own cap)."""
  if max_tokens_per_row is None:
    return jnp.full((n_rows,), n, jnp.int32)
  budget = jnp.asarray(max_tokens_per_row, jnp.int32)
  assert budget.shape == (n_rows,), (budget.shape, n_rows)
  return jnp.minimum(budget, n)


def generate(model_or_graphdef, state=None, *, prompt_ids_bt, prompt_mask_bt, rng,
             group_size: int = 1, params: SamplingParams = SamplingParams(),
             slots: int | None = None, max_tokens_per_row=None, mesh=None):
  """Samples G completions per prompt.

  Args:
    model_or_graphdef: an nnx model, or its graphdef with `state` (params + other).
    prompt_ids_bt, prompt_mask_bt: left-padded prompts [B, Tp] and their mask.
    slots: None decodes all B*G rows together until the longest ends (plain batching);
      an int S batches continuously over S rows, refilling finished rows with waiting
      samples (`r1jax.sampling.continuous`; with a mesh, S / shards rows on each shard
      of its batch axes, fed from one prompt queue). Same outputs either way.
    max_tokens_per_row: optional [B*G] ints: row r stops after that many tokens (as if
      max_new_tokens were smaller for it; its mask ends there).
    mesh: optional device mesh for data-parallel rollouts: the prompts split over its
      batch axes (`parallel.BATCH_AXES`; plain batching pads B to a multiple of their
      size with copies of the last prompt, whose rows are dropped) and each shard
      samples its own, with the weights gathered whole over those axes once. A split
      over `tensor` stays (each shard decodes tensor-parallel). With an `expert` axis
      > 1 the routed experts stay split over it in plain batching (expert-parallel
      decode, `r1jax.model.cached_moe`); with slots every shard holds every expert.
      Same outputs as one device. For models whose weights do not fit on one device
      without their fsdp split, leave it None and let the weights' own shardings drive
      the partitioning (`parallel.rollout_mesh` chooses for the stages).
  Returns a dict:
    tokens [B*G, N] int32 (row b*G + j is sample j of prompt b), mask [B*G, N] (1 up to
    and including the stop token), logprobs [B*G, N] fp32 log pi(token) at the sampling
    temperature, experts [L, B*G, N, k] and prompt_experts [L, B*G, Tp, k] (MoE only),
    steps: decode iterations run, slot_steps: decode rows x iterations paid for (slot
    utilisation = mask.sum() / slot_steps).
  """
  if state is None:
    graphdef, state = nnx.split(model_or_graphdef)
  else:
    graphdef = model_or_graphdef
  ids = jnp.asarray(prompt_ids_bt, jnp.int32)
  mask = jnp.asarray(prompt_mask_bt, jnp.int32)
  rng = as_typed_key(rng)
  budget_r = row_budgets(max_tokens_per_row, ids.shape[0] * group_size, params.max_new_tokens)
  if mesh is not None and row_axes(mesh):
    # The shard_maps below state every input's layout themselves; on a mesh of Explicit
    # axes they would instead demand the callers' arrays already carry those layouts.
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
  else:
    mesh = None
  if slots is not None:
    from r1jax.sampling import continuous  # pylint: disable=import-outside-toplevel
    return continuous.generate_continuous(graphdef, state, ids, mask, rng, budget_r, group_size,
                                          params, slots, mesh=mesh)
  if mesh is not None:
    out = _generate_sharded(graphdef, state, ids, mask, rng, budget_r, group_size, params, mesh)
  else:
    out = _generate(graphdef, state, ids, mask, rng, budget_r, group_size, params)
  return out


def slot_utilisation(out) -> float:
  """Useful tokens / (decode rows x decode iterations) of a `generate` result."""
  return float(np.asarray(out["mask"]).sum()) / max(int(out["slot_steps"]), 1)
