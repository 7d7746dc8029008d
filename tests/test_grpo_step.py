"""The jitted GRPO update: ratio is 1 at the first inner step with routing replay, and the
step on an 8-device mesh with expert parallelism matches one device."""

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax import optim, parallel
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig
from r1jax.rl import grpo, trainer
from r1jax.sampling.sampler import SamplingParams, generate

CFG = ModelConfig(n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=0, moe_d_ff=32)
B, G, N = 4, 4, 6


def _rl():
  rl = grpo.default_rl_config()
  rl.group_size, rl.max_new_tokens, rl.beta = G, N, 0.0
  return rl


def _rollout_batch(model, rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  ids = rng.integers(4, 60, (B, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  out = jax.device_get(generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(rng_seed),
                                group_size=G, params=SamplingParams(max_new_tokens=N)))
  batch = trainer.sequence_batch(ids, mask, out, G)
  rewards_bg = rng.integers(0, 2, (B, G)).astype(np.float32)
  batch["adv"] = np.asarray(grpo.group_advantages(rewards_bg)).reshape(-1).astype(np.float32)
  return batch, ids.shape[1]


def _update(mesh_shape, replay=True):
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  mesh = None if mesh_shape is None else parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  model = state_lib.create_model(CFG, seed=0, mesh=mesh)
  batch, tp = _rollout_batch(model)
  graphdef, st = state_lib.create_state(model, tx)
  rl = _rl()
  rl.routing_replay = replay
  update = jax.jit(trainer.make_update(graphdef, tx, rl, tp))
  if mesh is not None:
    batch = parallel.put_global_batch(mesh, batch)
  new_state, metrics = update(st, batch)
  return jax.device_get(metrics), new_state


def test_routing_replay_gives_ratio_one_at_first_inner_step():
  metrics, _ = _update(None, replay=True)
  assert abs(metrics["ratio_max"] - 1) < 1e-5 and abs(metrics["ratio_min"] - 1) < 1e-5
  assert metrics["clip_frac"] == 0
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4, 1), (1, 2, 2, 2)])
def test_grpo_update_on_mesh_matches_one_device(mesh_shape):
  ref_metrics, ref_state = _update(None)
  metrics, state = _update(mesh_shape)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_grpo_stage_runs_every_option_together(tmp_path):
  """DAPO dynamic sampling + overlong shaping, KL to a refreshed reference, mu=2 passes
  over 2 minibatches of 2 accumulated micro-batches, MoE with routing replay, continuous-
  batching rollouts over 8 slots:
  a 2-step stage runs and logs sane values."""
  import json
  from r1jax.rl import trainer as trainer_lib
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "stage=grpo", f"workdir={tmp_path}", "train.steps=2", "train.batch_size=4", "train.log_every=1",
      "train.seq_len=40", "data.n_train=64", "data.n_test=8", "eval.n=8", "rl.group_size=4",
      "rl.max_new_tokens=24", "rl.dynamic_sampling=true", "rl.oversample=2.0", "rl.overlong_buffer=8",
      "rl.beta=0.01", "rl.ref_refresh_every=1", "rl.mu=2", "rl.minibatches=2",
      "rl.microbatches=2", "model.n_experts=4", "model.top_k=2", "model.moe_d_ff=32", "rl.slots=8"])
  config_lib.validate(config)
  summary = trainer_lib.run(config, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and 0 <= summary["final_accuracy"] <= 1
  for row in rows:
    assert np.isfinite(row["loss"]) and row["kl"] >= 0 and 0 <= row["zero_variance_frac"] <= 1
    assert row["groups_filled"] <= 4
  assert (tmp_path / "reference").exists()
