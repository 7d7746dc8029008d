"""Gradient accumulation in the next-token step (train.microbatches; pretrain, SFT and
distillation): the passes' gradients, loss terms (NLL, MTP, sequence-wise balance) and
router-bias update equal one pass over the whole batch, on one device and on a mesh."""

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax import memory, optim, parallel, sft
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig
from test_grad_accumulation import assert_plan_counts_passes

DENSE_MTP = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=48,
                        mtp_depth=2)
MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=48,
                  n_experts=8, top_k=2, moe_d_ff=16, n_shared_experts=1, first_k_dense=1,
                  seq_balance_alpha=0.01, mtp_depth=1)


def _batch(b=8, t=12, vocab=64):
  """Rows the passes do not share evenly: a packed row of two examples, prompt tokens
  that are not targets, a row that is half padding and one that is all padding (no
  targets and no sequence for the balance loss)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[0, 5:] = 2        # two packed examples
  seg[1, 6:] = 0        # padding
  seg[4, :] = 0         # an empty row
  loss_mask = (seg > 0).astype(np.int32)
  loss_mask[2:4, :4] = 0  # SFT: the prompt is not a target
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  positions[0, 5:] -= 5
  return dict(tokens=tokens, loss_mask=loss_mask, segment_ids=seg, positions=positions)


def _step(cfg, microbatches, mesh_shape=None, mtp_weight=0.3):
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  mesh = None if mesh_shape is None else parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  graphdef, state = state_lib.create_state(state_lib.create_model(cfg, seed=0, mesh=mesh), tx)
  batch = _batch()
  if mesh is not None:
    batch = parallel.put_global_batch(mesh, batch)
  step = jax.jit(sft.make_step(graphdef, tx, mtp_weight=mtp_weight, bias_rate=0.01, microbatches=microbatches))
  if mesh is None:
    new_state, metrics = step(state, batch)
  else:  # as the stage loop runs it: MoE layers dispatch expert-parallel (all_to_all) in a shard_map
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(new_state)


def _assert_same_step(got, want, names):
  (m, st), (m0, st0) = got, want
  for name in names:
    np.testing.assert_allclose(m[name], m0[name], rtol=2e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(st0.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(st.other), jax.tree.leaves(st0.other)):  # the router bias
    np.testing.assert_allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_dense_mtp_passes_sum_to_one_pass(microbatches):
  want = _step(DENSE_MTP, 1)
  assert want[0]["mtp_nll"] > 0
  _assert_same_step(_step(DENSE_MTP, microbatches), want, ("loss", "nll", "mtp_nll", "tokens", "grad_norm"))


def test_moe_balance_loss_and_router_bias_match_one_pass():
  want = _step(MOE, 1)
  assert want[0]["balance_loss"] > 0
  got = _step(MOE, 4)  # the empty row leaves one pass with a row fewer for the balance mean
  _assert_same_step(got, want, ("loss", "nll", "mtp_nll", "balance_loss", "tokens", "grad_norm",
                                "expert_max_over_mean"))
  bias = [np.asarray(b) for b in jax.tree.leaves(got[1].other)]
  assert any(np.abs(b).max() > 0 for b in bias)  # the bias moved, and the same way


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4, 1), (4, 2, 1, 1)])
def test_microbatches_on_a_mesh_match_one_device(mesh_shape):
  # 8 rows on 8 batch shards in 2 passes: each pass's 4 rows live on half the devices.
  want = _step(MOE, 1)
  _assert_same_step(_step(MOE, 2, mesh_shape=mesh_shape), want, ("loss", "balance_loss", "grad_norm"))


def test_each_pass_divides_by_the_whole_batch():
  # The passes' losses are parts of the whole batch's mean, not means of their own rows.
  graphdef, st = state_lib.create_state(state_lib.create_model(MOE, seed=0), optim.make_optimizer(
      config_lib.default_config().optim, 10))
  model = state_lib.merge(graphdef, st.params, st.other)
  batch = _batch()
  totals = sft.loss_totals(batch, MOE.mtp_depth)
  assert int(totals["rows"]) == 7 and int(totals["tokens"]) == int(sft.next_token_mask(batch).sum())
  whole = sft.lm_loss(model, batch, 0.3)[0]
  halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  parts = [sft.lm_loss(model, h, 0.3, totals)[0] for h in halves]
  own = [sft.lm_loss(model, h, 0.3)[0] for h in halves]
  np.testing.assert_allclose(sum(parts), whole, rtol=1e-5)
  assert abs(sum(own) / 2 - whole) > 1e-4  # the per-pass means would not have given it


def test_config_rejects_a_batch_that_does_not_split(tmp_path):
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.train.microbatches = "sft", 6, 4
  with pytest.raises(config_lib.ConfigError, match=r"train.batch_size=6 rows do not split into "
                                                   r"train.microbatches=4"):
    config_lib.validate(c)
  c.train.microbatches = 0
  with pytest.raises(config_lib.ConfigError, match=r"train.microbatches=0 must be at least 1"):
    config_lib.validate(c)
  # A pipeline's per_stage overrides reach the stage after validate(): the stage checks again.
  c.train.microbatches = 4
  with pytest.raises(config_lib.ConfigError, match=r"\[pretrain\] train.batch_size=6 rows do not split"):
    sft.run(c, "pretrain", str(tmp_path))
  assert not any(tmp_path.iterdir())  # refused before writing anything


def test_memory_plan_counts_pass_rows_and_the_accumulator():
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.train.seq_len = "sft", 32, 256
  assert_plan_counts_passes(c, lambda c: c.train.update(microbatches=4), whole_rows=32, pass_rows=8)
  c.train.microbatches = 8  # 4 rows a pass on 8 batch shards
  assert any("some devices idle" in n for n in memory.estimate(c, (8, 1, 1, 1))["notes"])
