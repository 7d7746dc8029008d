"""Gradient accumulation in the GRPO update (rl.microbatches): the micro-batch gradients
sum to the one-pass gradient under every loss aggregation, the logged metrics are the
one-pass metrics, the reference forward in passes equals one pass, and the row split
keeps groups whole and every part spread over a row-sharded batch."""

import contextlib
import re

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax import memory, microbatch, optim, parallel
from r1jax import state as state_lib
from r1jax.rl import grpo, trainer
from r1jax.model.config import ModelConfig
from test_grpo_step import CFG, B, G, N, _rollout_batch

METRICS = ("loss", "pg_loss", "kl", "ratio_mean", "ratio_max", "ratio_min", "clip_frac", "old_kl",
           "n_tokens", "entropy", "grad_norm")


def _rl(**overrides):
  rl = grpo.default_rl_config()
  rl.update(group_size=G, max_new_tokens=N, beta=0.05, eps_low=0.1, eps_high=0.1, **overrides)
  return rl


def _batch(model):
  """test_grpo_step's rollout, with an early stop, an empty row, old log-probs off-policy
  (so ratios clip) and spread advantages."""
  batch, tp = _rollout_batch(model)
  rng = np.random.default_rng(1)
  batch["completion_mask"] = np.array(batch["completion_mask"])
  batch["completion_mask"][1, 3:] = 0  # a sample that stopped early
  batch["completion_mask"][5, :] = 0   # and one with no trained token
  batch["old_logp"] = batch["old_logp"] + rng.normal(0, 0.2, batch["old_logp"].shape).astype(np.float32)
  batch["adv"] = np.asarray(grpo.group_advantages(rng.normal(size=(B, G)))).reshape(-1).astype(np.float32)
  return batch, tp


def _step(rl, mesh_shape=None):
  """(metrics, new params, reference log-probs) of one update with `rl`."""
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  mesh = None if mesh_shape is None else parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  model = state_lib.create_model(CFG, seed=0, mesh=mesh)
  batch, tp = _batch(model)
  graphdef, st = state_lib.create_state(model, tx)
  ref_params = jax.tree.map(lambda p: p * 1.01, st.params)  # a reference that differs (kl > 0)
  if mesh is not None:
    batch = parallel.put_global_batch(mesh, batch)
  # Under the mesh, as the stage runs them: each pass's rows spread over the batch shards.
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    batch["ref_logp"] = jax.jit(trainer.make_reference_logprobs(graphdef, rl, tp))(ref_params, st.other, batch)
    new_state, metrics = jax.jit(trainer.make_update(graphdef, tx, rl, tp))(st, batch)
  return jax.device_get(metrics), jax.device_get(new_state.params), np.asarray(batch["ref_logp"])


def _assert_same_step(got, want):
  (m, params, ref), (m0, params0, ref0) = got, want
  np.testing.assert_allclose(ref, ref0, rtol=1e-5, atol=1e-6)
  for name in METRICS:
    np.testing.assert_allclose(m[name], m0[name], rtol=2e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_microbatches_sum_to_the_one_pass_update(aggregation):
  # 16 rows in 2 micro-batches of 2 whole groups each (the prompt runs once per group).
  one = _step(_rl(aggregation=aggregation))
  assert one[0]["clip_frac"] > 0 and one[0]["kl"] > 0  # the comparison exercises clipping and the KL
  _assert_same_step(_step(_rl(aggregation=aggregation, microbatches=2)), one)


def test_microbatches_smaller_than_a_group_and_with_minibatches():
  # 2 minibatches (2 optimizer steps) of 8 rows, each summed over 4 micro-batches of 2 rows:
  # groups split across micro-batches, so every row runs whole.
  want = _step(_rl(aggregation="token_mean", minibatches=2))
  _assert_same_step(_step(_rl(aggregation="token_mean", minibatches=2, microbatches=4)), want)


def test_microbatches_on_a_mesh_match_one_device():
  want = _step(_rl(microbatches=2))
  _assert_same_step(_step(_rl(microbatches=2), mesh_shape=(2, 1, 4, 1)), want)


def test_microbatches_on_a_mesh_match_one_device_when_groups_must_split():
  # 16 rows in 4 passes of one group on 8 batch shards: each pass's rows move so that
  # every device holds one of them, splitting the group (and its shared prompt) over 4.
  want = _step(_rl(microbatches=4))
  _assert_same_step(_step(_rl(microbatches=4), mesh_shape=(8, 1, 1, 1)), want)


def _local_mlp_rows(rl, mesh_shape):
  """Per-device row counts of the dense MLP's [rows, tokens, d_ff] activations in the
  compiled update (d_ff is a size nothing else has)."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=40)
  b, g, tp, n = 8, 4, 4, 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (b * g, tp + n)).astype(np.int32)
  batch = dict(tokens=tokens, segment_ids=np.ones_like(tokens),
               positions=np.tile(np.arange(tp + n, dtype=np.int32), (b * g, 1)),
               completion_mask=np.ones((b * g, n), np.int32), old_logp=np.zeros((b * g, n), np.float32),
               adv=rng.normal(size=b * g).astype(np.float32))
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  graphdef, st = state_lib.create_state(state_lib.create_model(cfg, 0, mesh), tx)
  rl.update(group_size=g, max_new_tokens=n, beta=0.0)
  with jax.set_mesh(mesh):
    text = jax.jit(trainer.make_update(graphdef, tx, rl, tp)).lower(st, parallel.put_global_batch(mesh, batch)
                                                                     ).compile().as_text()
  return {int(m) for m in re.findall(rf"f32\[(\d+),{n},40\]", text)}


def test_each_pass_spreads_over_every_batch_shard():
  # 32 rows (8 groups of 4) on 8 devices: one group each. One pass: 4 rows a device.
  assert _local_mlp_rows(_rl(), (8, 1, 1, 1)) == {4}
  # 4 minibatches or 4 micro-batches of 2 groups: without moving rows, a pass would run
  # on the 2 devices that hold its groups (4 rows each) and repeat on the other 6.
  assert _local_mlp_rows(_rl(minibatches=4), (8, 1, 1, 1)) == {1}
  assert _local_mlp_rows(_rl(microbatches=4), (2, 1, 4, 1)) == {1}  # over data x expert


def test_split_rows_interleaves_whole_groups():
  x = np.arange(16)
  parts = np.asarray(microbatch.split_rows(x, 2, 4))
  # Groups 0 and 2 in part 0, 1 and 3 in part 1: on 2 devices holding rows 0-7 and 8-15,
  # each part has a group on each device.
  np.testing.assert_array_equal(parts, [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]])
  np.testing.assert_array_equal(microbatch.merge_rows(parts, 4), x)
  rows = np.asarray(microbatch.split_rows(x, 8, 4))  # 2 rows a part: single rows, interleaved
  np.testing.assert_array_equal(rows[0], [0, 8])
  np.testing.assert_array_equal(microbatch.merge_rows(rows, 4), x)


def test_config_rejects_rows_that_do_not_split():
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.rl.group_size, c.rl.minibatches, c.rl.microbatches = "grpo", 5, 4, 2, 4
  with pytest.raises(config_lib.ConfigError, match=r"20 rollout rows do not split into rl.minibatches=2 x "
                                                   r"rl.microbatches=4"):
    config_lib.validate(c)
  c.rl.microbatches = 0
  with pytest.raises(config_lib.ConfigError, match=r"rl.microbatches=0 must be at least 1"):
    config_lib.validate(c)


def assert_plan_counts_passes(c, set_passes, whole_rows: int, pass_rows: int):
  """The dry-run plan of config `c` before and after `set_passes(c)`: the update's rows
  per device drop from whole_rows to pass_rows, an fp32 gradient accumulator the size of
  the gradients appears, and the update phase shrinks."""
  whole = memory.estimate(c, (1, 1, 1, 1))
  set_passes(c)
  split = memory.estimate(c, (1, 1, 1, 1))
  assert any(f"update: {pass_rows} row(s)" in n for n in split["notes"]), split["notes"]
  assert any(f"update: {whole_rows} row(s)" in n for n in whole["notes"]), whole["notes"]
  acc = [v for k, v in split["rows"].items() if k.startswith("update: gradient accumulator")]
  assert acc == [split["rows"]["gradients (fp32)"]]
  assert split["phases"]["update"] < whole["phases"]["update"]


def test_memory_plan_counts_micro_batch_rows_and_the_accumulator():
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.rl.group_size = "grpo", 8, 8
  assert_plan_counts_passes(c, lambda c: c.rl.update(microbatches=4), whole_rows=64, pass_rows=16)


def test_memory_plan_warns_when_a_pass_has_fewer_rows_than_shards():
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.rl.group_size, c.rl.microbatches = "grpo", 8, 8, 8  # 8 rows a pass
  assert any("some devices idle" in n for n in memory.estimate(c, (16, 1, 1, 1))["notes"])
  # One group a pass on 8 shards: its rows spread, a row a device (microbatch.spread_rows).
  assert not any("some devices idle" in n for n in memory.estimate(c, (8, 1, 1, 1))["notes"])


def test_grpo_stage_refuses_a_row_split_its_own_overrides_break(tmp_path):
  # A pipeline's per_stage overrides reach the stage after validate(): the stage checks again.
  c = config_lib.default_config()
  c.stage, c.train.batch_size, c.rl.group_size, c.rl.microbatches = "grpo", 5, 4, 8
  with pytest.raises(config_lib.ConfigError, match=r"\[grpo\] .*20 rollout rows do not split"):
    trainer.run(c, str(tmp_path))
  assert not any(tmp_path.iterdir())  # refused before writing anything
