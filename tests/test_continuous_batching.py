"""Continuous batching: same outputs as plain batching, high slot utilisation on a
heavy-tailed length mix, masks that end at each row's stop; data-parallel rollouts."""

import jax
import numpy as np
import pytest
from flax import nnx

from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer
from r1jax.sampling.sampler import SamplingParams, generate, slot_utilisation

DENSE_GQA = ModelConfig(n_heads=4, n_kv_heads=2)
MOE_MLA = ModelConfig(attention="mla", n_experts=4, top_k=2, n_shared_experts=1, q_lora_rank=8,
                      first_k_dense=1)


def _prompts(b=3, seed=0, vocab=96, length=6):
  """Left-padded prompts of different lengths [B, Tp] and their mask."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, size=b)
  mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.int32)
  return rng.integers(1, vocab, size=(b, length)).astype(np.int32) * mask, mask


def _heavy_tailed(n_rows, cap, seed=0):
  """Log-normal lengths, median cap/8, capped at cap (8x the median)."""
  rng = np.random.default_rng(seed)
  return np.clip(np.round(cap / 8 * np.exp(rng.standard_normal(n_rows))), 1, cap).astype(np.int32)


def _run(model, ids, mask, params, g, state=None, **kw):
  return jax.device_get(generate(model, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(7),
                                 group_size=g, params=params, **kw))


def _assert_same(plain, cont):
  np.testing.assert_array_equal(cont["tokens"], plain["tokens"])
  np.testing.assert_array_equal(cont["mask"], plain["mask"])
  np.testing.assert_allclose(cont["logprobs"], plain["logprobs"], atol=1e-5)
  for key in ("experts", "prompt_experts"):
    assert (plain[key] is None) == (cont[key] is None)
    if plain[key] is not None:
      m = plain["mask"][None, :, :, None] > 0 if key == "experts" else True
      np.testing.assert_array_equal(np.where(m, cont[key], 0), np.where(m, plain[key], 0))


def _one_device_and_mesh(model, mesh, b, g, n, prompt_seed, length_seed, **kw):
  """b prompts x g samples of heavy-tailed lengths (at most n tokens, T = 1), on one
  device (plain batching) and with generate(mesh=mesh, **kw): asserts they agree and
  returns (one device, mesh)."""
  ids, mask = _prompts(b, seed=prompt_seed)
  params = SamplingParams(max_new_tokens=n, temperature=1.0)
  budget = _heavy_tailed(b * g, n, seed=length_seed)
  one = _run(model, ids, mask, params, g, max_tokens_per_row=budget)
  split = _run(model, ids, mask, params, g, max_tokens_per_row=budget, mesh=mesh, **kw)
  _assert_same(one, split)
  return one, split


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_continuous_equals_plain_greedy(cfg):
  """Fewer slots than rows, rows of very different lengths: token for token the same."""
  model = Transformer(cfg, nnx.Rngs(0))
  ids, mask = _prompts(3)
  g, n = 3, 12
  budget = _heavy_tailed(3 * g, n, seed=1)
  params = SamplingParams(max_new_tokens=n, greedy=True)
  plain = _run(model, ids, mask, params, g, max_tokens_per_row=budget)
  cont = _run(model, ids, mask, params, g, max_tokens_per_row=budget, slots=4)
  _assert_same(plain, cont)
  np.testing.assert_array_equal(plain["mask"].sum(1), budget)


def test_continuous_equals_plain_sampled():
  """A row's draws depend on its output row and step, not on the slot it ran in."""
  model = Transformer(DENSE_GQA, nnx.Rngs(1))
  ids, mask = _prompts(4, seed=2)
  g = 4
  params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20)
  budget = _heavy_tailed(4 * g, 10, seed=3)
  plain = _run(model, ids, mask, params, g, max_tokens_per_row=budget)
  cont = _run(model, ids, mask, params, g, max_tokens_per_row=budget, slots=5)
  _assert_same(plain, cont)
  tokens = plain["tokens"].reshape(4, g, -1)
  assert len({tuple(r) for r in tokens[0]}) > 1  # the group's samples differ


def test_utilisation_heavy_tailed():
  """Plain batching idles most rows behind the longest; continuous keeps slots >= 90% busy."""
  model = Transformer(DENSE_GQA, nnx.Rngs(0))
  b, g, n = 32, 8, 32
  ids, mask = _prompts(b, seed=4)
  budget = _heavy_tailed(b * g, n, seed=5)
  params = SamplingParams(max_new_tokens=n, greedy=True)
  plain = _run(model, ids, mask, params, g, max_tokens_per_row=budget)
  cont = _run(model, ids, mask, params, g, max_tokens_per_row=budget, slots=16)
  _assert_same(plain, cont)
  useful = int(budget.sum())
  assert int(cont["mask"].sum()) == useful
  assert slot_utilisation(plain) < 0.3
  assert slot_utilisation(cont) >= 0.9, slot_utilisation(cont)
  assert int(cont["slot_steps"]) < int(plain["slot_steps"]) / 3


def test_early_stop_masks_end_at_the_stop():
  """EOS and stop sequences under continuous batching: each row's mask ends at its own
  stop, log-probs are 0 after it, and the refilled rows are unaffected."""
  model = Transformer(DENSE_GQA, nnx.Rngs(0))
  ids, mask = _prompts(3)
  n, g = 10, 2
  free = _run(model, ids, mask, SamplingParams(max_new_tokens=n, greedy=True), g)
  row = free["tokens"][0]
  eos, seq = int(row[3]), (int(row[4]), int(row[5]))
  for params in (SamplingParams(max_new_tokens=n, greedy=True, eos_ids=(eos,)),
                 SamplingParams(max_new_tokens=n, greedy=True, stop_sequences=(seq,))):
    cont = _run(model, ids, mask, params, g, slots=2)
    _assert_same(_run(model, ids, mask, params, g), cont)
    for r in range(3 * g):
      toks, m = free["tokens"][r], cont["mask"][r]
      if params.eos_ids:
        hits = [i for i in range(n) if toks[i] == eos]
      else:
        hits = [i for i in range(1, n) if (toks[i - 1], toks[i]) == seq]
      length = hits[0] + 1 if hits else n
      assert m[:length].all() and not m[length:].any(), (r, m, hits)
      assert (cont["logprobs"][r][length:] == 0).all()
      np.testing.assert_array_equal(cont["tokens"][r][:length], toks[:length])
    assert cont["mask"][0].sum() < n  # row 0 did stop early


def test_one_slot_and_more_slots_than_rows():
  model = Transformer(DENSE_GQA, nnx.Rngs(0))
  ids, mask = _prompts(2)
  params = SamplingParams(max_new_tokens=5, greedy=True)
  plain = _run(model, ids, mask, params, 2)
  for slots in (1, 9):
    _assert_same(plain, _run(model, ids, mask, params, 2, slots=slots))


def test_data_parallel_rollouts_equal_one_device():
  """generate(mesh=...) splits the prompts over the batch axes: same outputs."""
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "tensor"))
  one, split = _one_device_and_mesh(Transformer(MOE_MLA, nnx.Rngs(2)), mesh, 4, 2, 6, 6, 7)
  assert int(split["steps"]) == int(one["steps"])


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_continuous_batching_over_the_mesh_equals_one_device(cfg, monkeypatch):
  """generate(slots=S, mesh=...) runs a batcher on every device of the batch axes, with
  S / 4 slots each, fed from one queue of 5 prompts: the same outputs as plain batching
  on one device, and each device's decode loop only ever holds its own 2 slots (not the
  S = 8 of one batcher)."""
  from r1jax.sampling import continuous
  shard_rows, real_decode = [], continuous._decode

  def spy_decode(graphdef, state, c, *args, **kw):
    shard_rows.append(c["live"].sharding.shard_shape(c["live"].shape)[0])
    return real_decode(graphdef, state, c, *args, **kw)

  monkeypatch.setattr(continuous, "_decode", spy_decode)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  one, split = _one_device_and_mesh(Transformer(cfg, nnx.Rngs(2)), mesh, 5, 2, 16, 6, 7, slots=8)
  assert shard_rows and max(shard_rows) == 2, shard_rows  # 2 slots a device (fewer once the tail shrinks)
  # Every device's decode iterations are counted: at least the tokens, at most its slots x its steps.
  assert one["mask"].sum() <= int(split["slot_steps"]) <= 8 * int(split["steps"])


def test_rollouts_over_the_batch_axes_keep_tensor_split_weights_split(monkeypatch):
  """On a (data 2, tensor 2) mesh with the weights split over `tensor` (the training
  layout), generate(mesh=...) splits the prompts over `data` and leaves the tensor split
  to XLA: the same samples as one device, and no device gathers the weights whole
  (before, the sampler's shard_map gathered them: ~1.4x the weights in temporaries
  here). Continuous batching keeps the split too."""
  import jax.numpy as jnp
  from r1jax import parallel
  from r1jax import state as state_lib
  from r1jax.sampling import continuous, sampler
  cfg = ModelConfig(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512)
  mesh = parallel.make_mesh(dict(data=2, fsdp=1, expert=1, tensor=2), devices=jax.devices()[:4])
  graphdef, state = nnx.split(state_lib.create_model(cfg, seed=0, mesh=mesh))
  tensor_split = [x for x in jax.tree.leaves(state) if "tensor" in jax.tree.leaves(tuple(x.sharding.spec))]
  assert len(tensor_split) >= 3 * cfg.n_layers  # heads / FFN width / vocabulary over tensor
  one_device = nnx.merge(graphdef, jax.device_get(state))
  ids, mask = _prompts(4, seed=3)
  params = SamplingParams(max_new_tokens=8, temperature=1.0)
  one = _run(one_device, ids, mask, params, 2)
  _assert_same(one, _run(graphdef, ids, mask, params, 2, state=state, mesh=mesh))

  auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  compiled = sampler._generate_sharded.lower(
      graphdef, state, jnp.asarray(ids), jnp.asarray(mask), sampler.as_typed_key(jax.random.key(7)),
      sampler.row_budgets(None, 8, 8), 2, params, auto).compile()
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().temp_size_in_bytes < weight_bytes / 4, compiled.memory_analysis()

  kept, real_decode = [], continuous._decode

  def spy_decode(graphdef, state, c, *args, **kw):
    kept.append(sum("tensor" in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(state)))
    return real_decode(graphdef, state, c, *args, **kw)

  monkeypatch.setattr(continuous, "_decode", spy_decode)
  _assert_same(one, _run(graphdef, ids, mask, params, 2, state=state, mesh=mesh, slots=4))
  assert kept and set(kept) == {len(tensor_split)}


def test_continuous_batching_over_the_mesh_steals_waiting_samples(monkeypatch):
  """2 prompts x G = 8 over 4 shards of 2 slots: the shards that get no prompt take the
  unstarted samples of another shard's prompt (prefilling it again themselves), and the
  outputs still equal one device's."""
  from r1jax.sampling import continuous
  windows, real_prefill = [], continuous._prefill_store

  def spy_prefill(graphdef, state, ids, mask, cache_len, mesh=None):
    windows.append(np.asarray(ids).reshape(4, -1, ids.shape[1]))
    return real_prefill(graphdef, state, ids, mask, cache_len, mesh)

  monkeypatch.setattr(continuous, "_prefill_store", spy_prefill)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  one, split = _one_device_and_mesh(Transformer(DENSE_GQA, nnx.Rngs(4)), mesh, 2, 8, 12, 9, 3, slots=8)
  ids, _ = _prompts(2, seed=9)
  # Which shards prefilled each prompt (a shard's store row 0 holds its current prompt).
  shards_of = {p: {i for w in windows for i in range(4) if (w[i, 0] == ids[p]).all()} for p in range(2)}
  assert max(len(s) for s in shards_of.values()) >= 2, shards_of
  assert one["mask"].sum() <= int(split["slot_steps"])
