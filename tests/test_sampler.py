"""Sampler: cached decode == full recomputation, rollout log-probs == trainer log-probs,
stop handling, and the token filters' distributions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer, token_logprobs
from r1jax.sampling import filters
from r1jax.sampling.sampler import SamplingParams, generate

DENSE_GQA = ModelConfig(n_heads=4, n_kv_heads=2)
MOE_MLA = ModelConfig(attention="mla", n_experts=4, top_k=2, n_shared_experts=1, q_lora_rank=8,
                      first_k_dense=1)


def _prompts():
  ids = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 0, 0, 4, 8]], np.int32)
  mask = (ids > 0).astype(np.int32)
  return ids, mask


def _greedy_by_recomputation(model, ids, mask, n):
  """Greedy decoding with no cache: a full forward over the whole sequence each step."""
  rows = []
  for b in range(ids.shape[0]):
    seq = [int(t) for t, m in zip(ids[b], mask[b]) if m]
    for _ in range(n):
      logits, _ = model(jnp.asarray([seq], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, -1])))
    rows.append(seq[-n:])
  return np.array(rows)


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_cached_greedy_equals_full_recomputation(cfg):
  model = Transformer(cfg, nnx.Rngs(0))
  ids, mask = _prompts()
  out = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0),
                 params=SamplingParams(max_new_tokens=6, greedy=True))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), _greedy_by_recomputation(model, ids, mask, 6))


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_rollout_logprobs_equal_trainer_logprobs(cfg):
  model = Transformer(cfg, nnx.Rngs(1))
  ids, mask = _prompts()
  g, n = 3, 7
  out = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(3), group_size=g,
                 params=SamplingParams(max_new_tokens=n, temperature=0.7))
  tokens = np.concatenate([np.repeat(ids, g, 0), np.asarray(out["tokens"])], 1)
  seg = np.concatenate([np.repeat(mask, g, 0), np.asarray(out["mask"])], 1)
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
  forced = None
  if out["experts"] is not None:  # routing replay: the trainer sees the rollout's experts
    forced = jnp.concatenate([out["prompt_experts"], out["experts"]], axis=2)
  logits, aux = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), forced_experts=forced)
  tp = ids.shape[1]
  logp = token_logprobs(logits[:, tp - 1:-1] / 0.7, jnp.asarray(tokens[:, tp:]))
  m = np.asarray(out["mask"]) > 0
  assert m.all()
  np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out["logprobs"])[m], atol=1e-5)
  if forced is not None:  # without forcing, the trainer's own routing picks the same experts
    np.testing.assert_array_equal(np.asarray(aux["experts"]), np.asarray(forced))


def test_group_shares_prefill_and_rows_differ():
  model = Transformer(DENSE_GQA, nnx.Rngs(0))
  ids, mask = _prompts()
  out = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0), group_size=4,
                 params=SamplingParams(max_new_tokens=8))
  tokens = np.asarray(out["tokens"]).reshape(3, 4, 8)
  assert len({tuple(r) for r in tokens[0]}) > 1  # the G samples are not copies
  again = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0), group_size=4,
                   params=SamplingParams(max_new_tokens=8))
  np.testing.assert_array_equal(np.asarray(again["tokens"]), np.asarray(out["tokens"]))  # same key


def test_stop_token_and_stop_sequence_end_the_mask():
  model = Transformer(DENSE_GQA, nnx.Rngs(0))
  ids, mask = _prompts()
  free = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0),
                  params=SamplingParams(max_new_tokens=10, greedy=True))
  row = np.asarray(free["tokens"])[0]
  eos = int(row[3])
  out = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0),
                 params=SamplingParams(max_new_tokens=10, greedy=True, eos_ids=(eos,)))
  first = int(np.argmax(row == eos))
  m = np.asarray(out["mask"])[0]
  assert m[:first + 1].all() and not m[first + 1:].any()
  assert (np.asarray(out["logprobs"])[0][first + 1:] == 0).all()
  seq = (int(row[4]), int(row[5]))
  out = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0),
                 params=SamplingParams(max_new_tokens=10, greedy=True, stop_sequences=(seq,)))
  m = np.asarray(out["mask"])[0]
  ends = [i for i in range(1, 10) if (row[i - 1], row[i]) == seq]
  assert m.sum() == ends[0] + 1


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (2, 1.0, 1.0), (0, 0.7, 1.0),
                                                       (0, 1.0, 0.5)])
def test_filtered_sampling_matches_distribution(top_k, top_p, temperature):
  logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
  n = 20000
  tokens, _ = filters.sample(jax.random.key(0), jnp.tile(logits, (n, 1)), temperature, top_k, top_p, False)
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  p = np.exp(np.asarray(logits) / temperature)
  p /= p.sum()
  if top_k:
    p[np.argsort(-p)[top_k:]] = 0
  if top_p < 1:
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    p[order[before >= top_p]] = 0
  p /= p.sum()
  np.testing.assert_allclose(freq, p, atol=0.015)


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (2, 1.0, 1.0), (0, 0.7, 1.0),
                                                       (0, 1.0, 0.5)])
def test_per_row_sampling_matches_distribution(top_k, top_p, temperature):
  """sample_rows (one key per row, inverse CDF) draws from the same distribution as
  sample, and its log-probs are those of the unfiltered tempered policy."""
  logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  tokens, logp = filters.sample_rows(keys, jnp.tile(logits, (n, 1)), temperature, top_k, top_p, False)
  ref_tokens, _ = filters.sample(jax.random.key(2), jnp.tile(logits, (n, 1)), temperature, top_k, top_p, False)
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  ref = np.bincount(np.asarray(ref_tokens), minlength=4) / n
  np.testing.assert_allclose(freq, ref, atol=0.02)
  expected = np.asarray(jax.nn.log_softmax(logits / temperature))[np.asarray(tokens)]
  np.testing.assert_allclose(np.asarray(logp), expected, atol=1e-6)


def test_blocked_cumsum_equals_cumsum():
  x = jax.random.uniform(jax.random.key(0), (3, 37))  # 37: not a multiple of the block
  np.testing.assert_allclose(np.asarray(filters.cumsum_last(x)), np.asarray(jnp.cumsum(x, axis=-1)), rtol=1e-6)


@pytest.mark.parametrize("cfg", [ModelConfig(n_heads=4, n_kv_heads=2),
                                 ModelConfig(attention="mla", rope_type="yarn", rope_factor=4.0,
                                             yarn_mscale_all_dim=1.0, yarn_mscale=1.0)],
                         ids=["gqa", "mla_yarn"])
def test_rope_tables_equal_apply_rope(cfg):
  """The decoder's once-per-forward RoPE tables rotate exactly like layers.apply_rope."""
  from r1jax.model import attention, layers  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, cfg.rope_dim))
  pos = jnp.array([[0, 1, 2, 3, 4], [7, 9, 11, 40, 100]])
  for interleaved in (False, True):
    want = layers.apply_rope(x, pos, *layers.rope_inv_freq(cfg), interleaved=interleaved)
    got = attention.rotate(x, attention.rope_tables(cfg, pos), interleaved)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("forced", ["none", "replay", "skewed"])
def test_cached_moe_equals_moe_module(forced):
  """The sampling path's MoE dispatch (capacity buffers, chosen at run time) gives the
  module's outputs and experts: with its own routing, with replayed experts, and with a
  skewed replay whose busiest expert overflows every capacity (the module's fallback)."""
  from r1jax.model.cached_moe import cached_moe, moe_capacities  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(n_experts=16, top_k=2, n_shared_experts=1, moe_d_ff=32, d_model=32)
  moe = Transformer(cfg, nnx.Rngs(3)).layers[0].ffn
  b, t = 40, 1
  x = jax.random.normal(jax.random.key(4), (b, t, cfg.d_model))
  experts = None
  if forced == "replay":
    experts = jax.random.randint(jax.random.key(5), (b, t, 1), 0, 8)
    experts = jnp.concatenate([experts, experts + 8], axis=-1)  # distinct per token
  elif forced == "skewed":
    experts = jnp.broadcast_to(jnp.array([3, 5]), (b, t, 2))
    assert b > moe_capacities(b, cfg.n_experts, cfg.top_k)[-1]
  want_y, want_e = moe(x, experts)
  got_y, got_e = jax.jit(lambda x, e: cached_moe(moe, x, e))(x, experts)
  np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), atol=1e-5)


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_cache_segments_change_nothing_but_the_cache_length(cfg):
  """Decoding in segments over a growing cache (GQA keys slots-last, values and MLA
  latents slots in the middle) gives the same tokens, masks and experts as one loop over
  the full cache, and the same log-probs up to float rounding, with rows stopping early
  at a stop token."""
  model = Transformer(cfg, nnx.Rngs(2))
  ids, mask = _prompts()
  base = SamplingParams(max_new_tokens=9, temperature=1.0)
  free = generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(5), group_size=2,
                  params=base)
  eos = int(np.asarray(free["tokens"])[0, 2])  # some rows stop inside the first segment
  outs = [generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(5), group_size=2,
                   params=dataclasses.replace(base, eos_ids=(eos,), cache_segments=s)) for s in (1, 3, 9)]
  assert np.asarray(outs[0]["mask"]).sum(-1).min() < 9  # the early stop happened
  for out in outs[1:]:
    for key in ("tokens", "mask"):
      np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(outs[0][key]), err_msg=key)
    # Shorter caches sum the (exactly zero) masked slots in another order: last-bit changes.
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(outs[0]["logprobs"]), atol=2e-6)
    if cfg.n_experts:
      np.testing.assert_array_equal(np.asarray(out["experts"]), np.asarray(outs[0]["experts"]))
