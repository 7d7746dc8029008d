"""model.logits_chunk: per-token log-probs a block of tokens at a time keep the values and
gradients of the whole [B, T, V] computation, in the GRPO and SFT losses too, and do cut
what XLA allocates for the backward pass.

Every length here is not a multiple of the block, so the last block is padded: an
off-by-one in the blocking moves targets against logits and changes the values.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sft
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig
from r1jax.model.logprobs import token_logprobs_from_hidden
from r1jax.rl import trainer

CFG = ModelConfig(n_heads=4, n_kv_heads=2, init_std=0.2)  # init_std: log-probs far from uniform
G, N = 3, 7


def _models(cfg, chunk):
  """(graphdef whole, graphdef chunked, params, other): one seed, the two configs."""
  graphdef, params, other = state_lib.split_model(state_lib.create_model(cfg, seed=1))
  graphdef_c, params_c, _ = state_lib.split_model(
      state_lib.create_model(dataclasses.replace(cfg, logits_chunk=chunk), seed=1))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_c)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return graphdef, graphdef_c, params, other


def _assert_close_trees(got, want, rtol=1e-4, atol=1e-5):
  """Leaf by leaf; atol relative to the leaf's largest entry (fp32 sums in another order)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol * max(np.abs(b).max(), 1e-3))


@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_equals_direct_values_entropy_and_grads(chunk):
  b, t, d, v = 2, 13, 8, 33
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h_btd = jax.random.normal(k1, (b, t, d))
  w_dv = jax.random.normal(k2, (d, v))
  targets_bt = jax.random.randint(k3, (b, t), 0, v)
  weights_bt = jnp.arange(1, b * t + 1, dtype=jnp.float32).reshape(b, t)  # every position counts differently

  def run(w_dv, h_btd, chunk):
    head = lambda x_btd: jnp.einsum("btd,dv->btv", x_btd, w_dv)  # closes over w, as model.head does
    logp, ent = token_logprobs_from_hidden(head, h_btd, targets_bt, chunk, 0.7, with_entropy=True)
    return (logp * weights_bt).sum() + (ent * weights_bt).sum(), (logp, ent)

  grad = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True), static_argnums=2)
  (_, (logp, ent)), grads = grad(w_dv, h_btd, chunk)
  (_, (logp_ref, ent_ref)), grads_ref = grad(w_dv, h_btd, 0)
  # The reference written out, so that it is not the function checking itself.
  logp_all = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h_btd, w_dv) / 0.7, axis=-1)
  np.testing.assert_allclose(np.asarray(logp_ref),
                             np.take_along_axis(np.asarray(logp_all), np.asarray(targets_bt)[..., None], -1)[..., 0],
                             atol=1e-5)
  assert np.asarray(logp_ref).std() > 0.5  # not a flat distribution: misaligned targets would show
  np.testing.assert_allclose(np.asarray(logp), np.asarray(logp_ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_ref), atol=1e-5)
  _assert_close_trees(grads, grads_ref, rtol=1e-5, atol=1e-5)
  # Without the temperature or entropy: logp alone.
  logp_only = token_logprobs_from_hidden(lambda x: jnp.einsum("btd,dv->btv", x, w_dv), h_btd, targets_bt, chunk)
  assert logp_only.shape == (b, t) and logp_only.dtype == jnp.float32


def _rollout_batch(vocab: int):
  """3 left-padded prompts x G rows with completions of N tokens; some stop early."""
  rng = np.random.default_rng(0)
  ids = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 0, 0, 4, 8]], np.int32)
  pmask = (ids > 0).astype(np.int32)
  lengths = np.array([2, 7, 5, 7, 1, 6, 7, 3, 7])
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  out = dict(tokens=rng.integers(1, vocab, (3 * G, N)).astype(np.int32) * mask, mask=mask,
             logprobs=np.zeros((3 * G, N), np.float32))
  return jax.tree.map(jnp.asarray, trainer.sequence_batch(ids, pmask, out, G)), ids.shape[1]


@pytest.mark.parametrize("group_size", [0, G], ids=["whole_rows", "shared_prefix"])
def test_grpo_completion_logprobs_chunked_equal_whole(group_size):
  graphdef, graphdef_c, params, other = _models(CFG, chunk=3)
  batch, tp = _rollout_batch(CFG.vocab_size)
  mask = batch["completion_mask"] > 0

  def loss(p, graphdef):
    logp, ent = trainer.completion_logprobs(graphdef, p, other, batch, tp, 0.7, replay=False,
                                            with_entropy=True, group_size=group_size)
    return jnp.where(mask, logp, 0).sum() + 0.1 * jnp.where(mask, ent, 0).sum(), (logp, ent)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (s, (logp, ent)), g = grad(params, graphdef_c)
  (s_ref, (logp_ref, ent_ref)), g_ref = grad(params, graphdef)
  assert logp.shape == (3 * G, N)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(logp_ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_ref), atol=1e-5)
  np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-5)
  _assert_close_trees(g, g_ref)


def _sft_batch(vocab: int, t: int = 14):
  """Two packed / padded rows: targets T-1 = 13 positions, not a multiple of the block."""
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 6 + [2] * (t - 6), [1] * 9 + [0] * (t - 9)], np.int32)
  pos = np.array([list(range(6)) + list(range(t - 6)), list(range(9)) + [0] * (t - 9)], np.int32)
  loss_mask = seg.copy()
  loss_mask[0, :3] = 0  # a prompt that is not a target
  return jax.tree.map(jnp.asarray, dict(tokens=rng.integers(1, vocab, (2, t)).astype(np.int32), positions=pos,
                                        segment_ids=seg, loss_mask=loss_mask))


def test_sft_lm_loss_chunked_equals_whole():
  cfg = dataclasses.replace(CFG, mtp_depth=1)  # the MTP loss (unchunked) rides along
  graphdef, graphdef_c, params, other = _models(cfg, chunk=5)
  batch = _sft_batch(cfg.vocab_size)

  def loss(p, graphdef):
    return sft.lm_loss(state_lib.merge(graphdef, p, other), batch, mtp_weight=0.3)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l, (metrics, _)), g = grad(params, graphdef_c)
  (l_ref, (metrics_ref, _)), g_ref = grad(params, graphdef)
  np.testing.assert_allclose(float(metrics["nll"]), float(metrics_ref["nll"]), rtol=1e-6)
  np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-6)
  _assert_close_trees(g, g_ref)


def test_chunked_backward_allocates_a_fraction_of_whole_logits():
  """grad of the SFT loss, V = 4096 and T = 256 with a tiny trunk: the [B, T, V] logits
  dominate. Measured on XLA:CPU: 37.1 MB of temporaries whole, 7.9 MB in blocks of 32
  (0.21x); without the jax.checkpoint around each block, 15.3 MB (0.41x), which the bound
  0.3x rejects."""
  b, t = 2, 256
  batch = dict(tokens=jnp.zeros((b, t), jnp.int32), positions=jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
               segment_ids=jnp.ones((b, t), jnp.int32), loss_mask=jnp.ones((b, t), jnp.int32))

  def temp_bytes(chunk):
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, vocab_size=4096,
                      logits_chunk=chunk)
    graphdef, params, other = state_lib.split_model(state_lib.create_model(cfg, seed=0))
    loss = lambda p: sft.lm_loss(state_lib.merge(graphdef, p, other), batch)[0]
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(32)
  logits_bytes = b * t * 4096 * 4
  assert whole > 2 * logits_bytes, (whole, logits_bytes)  # the reference does hold the logits
  assert chunked < 0.3 * whole, (chunked, whole)
