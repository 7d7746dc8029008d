"""Reward model: the Bradley-Terry loss against NumPy, the trunk's hidden states against
the LM's own logits, training on a separable preference set, and the GRPO reward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import config as config_lib
from r1jax import optim, reward_model
from r1jax import state as state_lib
from r1jax.data import tasks
from r1jax.model.config import ModelConfig
from r1jax.rl import rewards


def test_bt_loss_matches_numpy():
  rng = np.random.default_rng(0)
  chosen, rejected = rng.normal(0, 5, 64), rng.normal(0, 5, 64)
  chosen[:4], rejected[:4] = [100.0, -100.0, 0.0, 30.0], [-100.0, 100.0, 0.0, 30.0]  # saturated
  want = np.mean(np.logaddexp(0.0, -(chosen - rejected)))  # -log sigmoid(c - r)
  got = float(reward_model.bt_loss(jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isfinite(got)


def test_hidden_states_are_the_lm_trunk():
  cfg = ModelConfig()
  rm = reward_model.RewardModel(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, 90, (2, 12)), jnp.int32)
  seg = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  trunk = nnx.jit(lambda m, t, p, s: (m.lm.head(reward_model.hidden_states(m.lm, t, p, s)),
                                      m.lm(t, p, s)[0], m(t, p, s)))
  from_hidden, logits, r = trunk(rm, tokens, pos, seg)
  np.testing.assert_allclose(np.asarray(from_hidden), np.asarray(logits), atol=1e-6)
  # The score reads the last real token: what follows it (padding) changes nothing.
  _, _, r_padded = trunk(rm, tokens.at[1, 7:].set(5), pos, seg)
  assert float(r_padded[1]) == pytest.approx(float(r[1]), abs=1e-6)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_sum_to_the_one_pass_step(microbatches):
  # 8 pairs [2P, T] (chosen rows, then their rejected rows) with padding of varied length:
  # passes of whole pairs, each dividing by all 8 pairs, give the one-pass step.
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=48)
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  graphdef, st = state_lib.create_state(reward_model.RewardModel(cfg, nnx.Rngs(0)), tx)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (16, 10)).astype(np.int32)
  seg = (np.arange(10)[None] < rng.integers(3, 11, (16, 1))).astype(np.int32)
  batch = dict(tokens=tokens, segment_ids=seg, positions=np.tile(np.arange(10, dtype=np.int32), (16, 1)))
  runs = [jax.jit(reward_model.make_step(graphdef, tx, k))(st, batch) for k in (1, microbatches)]
  (want_state, want), (got_state, got) = jax.device_get(runs)
  assert 0 < want["accuracy"] < 1
  for name in ("loss", "accuracy", "margin", "grad_norm"):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


YES, NO = "<think>ok</think><answer>yes</answer>", "<think>ok</think><answer>no</answer>"


def _pairs_file(path, n, seed):
  """A trivially separable set: the prompt says which answer it wants. Half the pairs
  prefer "yes", half "no", so a model that ignores the prompt is at chance (0.5)."""
  with open(path, "w") as f:
    for i, e in enumerate(tasks.generate("arithmetic", n, seed=seed, split="train")):
      want_yes = i % 2 == 0
      f.write(json.dumps(dict(prompt=f"{e['prompt']} say {'yes' if want_yes else 'no'}",
                              chosen=YES if want_yes else NO,
                              rejected=NO if want_yes else YES)) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rm")
  _pairs_file(tmp / "train.jsonl", 64, seed=0)
  _pairs_file(tmp / "test.jsonl", 16, seed=1)
  c = config_lib.default_config()
  c.stage = "reward_model"
  c.train.update(steps=30, batch_size=8, seq_len=32, log_every=1, checkpoint_every=30)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.reward_model.update(data_path=str(tmp / "train.jsonl"), test_path=str(tmp / "test.jsonl"))
  summary = reward_model.run(c, str(tmp / "run"))
  metrics = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
  return c, tmp / "run", summary, metrics


def test_training_separates_a_trivial_preference_set(trained):
  _, _, summary, metrics = trained
  assert summary["heldout_pair_accuracy_before"] < 0.9
  assert summary["heldout_pair_accuracy_after"] > 0.9
  assert metrics[0]["loss"] > 0.5 and metrics[-1]["loss"] < 0.2  # from ~log 2 at init


def test_reward_function_scores_with_the_checkpoint(trained):
  config, workdir, _, _ = trained
  grpo = config.copy_and_resolve_references()
  grpo.reward_model.update(path=str(workdir / "checkpoints"), scope="unverifiable", score_batch=4)
  grpo = reward_model.prepare_grpo(grpo)
  assert grpo.rl.reward_weights == "accuracy:1,format:0.1,reward_model:1.0"
  weights, fns = rewards.resolve(grpo.rl.reward_weights)
  prompts = ["write a poem, say yes", "write a poem, say yes", "12+30 say no", "12+30 say no"]
  completions = [YES, NO, NO, YES]
  example = [dict(task="general"), dict(task="general"), dict(task="arithmetic"), dict(task="arithmetic")]
  scores = fns["reward_model"](prompts, completions, example=example)
  assert scores[0] > scores[1] and scores[2] == scores[3] == 0.0  # verifiable rows keep rule rewards
  reward_model.configure(grpo.reward_model.path, scope="all", batch=4)
  scores = fns["reward_model"](prompts, completions, example=example)
  assert scores[2] > scores[3]
