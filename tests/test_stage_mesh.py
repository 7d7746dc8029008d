"""Stage loops trace their steps under the mesh: with mesh.expert > 1 the MoE layers of a
real training stage run expert-parallel (shard_map + all_to_all), not only in unit tests."""

import re

import numpy as np

from r1jax import config as config_lib
from r1jax import sft
from r1jax.model import expert_parallel


def test_pretrain_stage_runs_moe_expert_parallel(tmp_path, monkeypatch):
  calls = []
  real = expert_parallel.moe_expert_parallel

  def spy(cfg, mesh, *args):
    calls.append(dict(mesh.shape))
    return real(cfg, mesh, *args)

  monkeypatch.setattr(expert_parallel, "moe_expert_parallel", spy)
  c = config_lib.default_config()
  c.stage = "pretrain"
  c.model.update(n_experts=4, top_k=2, moe_d_ff=32, n_layers=2)
  c.mesh.update(data=-1, expert=2)
  c.train.update(steps=2, batch_size=8, seq_len=48, log_every=1, checkpoint_every=2, mtp_weight=0.0)
  c.data.update(n_train=64, n_test=8)
  summary = sft.run(c, "pretrain", str(tmp_path / "wd"))
  assert calls and all(shape["expert"] == 2 for shape in calls), calls
  assert np.isfinite(summary["final_loss"])


def test_grpo_rollouts_split_over_the_mesh_expert_parallel(tmp_path, monkeypatch, capsys):
  """A GRPO stage on a (data 4, expert 2) mesh samples its rollouts with the prompts
  split over the batch axes and the routed experts over `expert` (cached_moe's
  expert-parallel branch), rather than every device decoding every row."""
  from r1jax.model import cached_moe
  from r1jax.rl import trainer as trainer_lib
  from r1jax.sampling import sampler
  meshes, ep_calls = [], []
  real_generate, real_ep = sampler.generate, cached_moe._expert_parallel

  def spy_generate(*args, **kw):
    meshes.append(None if kw.get("mesh") is None else dict(kw["mesh"].shape))
    return real_generate(*args, **kw)

  def spy_ep(run, x_nd, *args):
    ep_calls.append(x_nd.shape)
    return real_ep(run, x_nd, *args)

  monkeypatch.setattr(trainer_lib, "generate", spy_generate)
  monkeypatch.setattr(cached_moe, "_expert_parallel", spy_ep)
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "stage=grpo", f"workdir={tmp_path}", "train.steps=1", "train.batch_size=8", "train.log_every=1",
      "train.seq_len=40", "data.n_train=64", "data.n_test=8", "eval.n=8", "eval.every=0",
      "rl.group_size=2", "rl.max_new_tokens=12", "model.n_experts=4", "model.top_k=2",
      "model.moe_d_ff=32", "model.n_layers=2", "mesh.data=-1", "mesh.expert=2"])
  config_lib.validate(config)
  summary = trainer_lib.run(config, str(tmp_path))
  assert meshes and meshes[0] is not None and meshes[0]["data"] == 4 and meshes[0]["expert"] == 2, meshes
  # Traced per MoE layer: the prefill of each device's own prompt (8 prompts / 8 devices,
  # 28 prompt tokens) and decode steps of its own rows (16 rows / 8 = 2). Unsplit, the
  # prefill alone would route 8 x 28 = 224 tokens on every device.
  assert {(28, 64), (2, 64)} <= set(ep_calls) and max(s[0] for s in ep_calls) <= 28, sorted(set(ep_calls))
  assert 0 <= summary["final_accuracy"] <= 1
  out = capsys.readouterr().out
  assert "[grpo] rollouts: 8 prompts split over 8 devices, routed experts split over expert=2" in out
  # Before its first step the stage says what its state holds on a device: AdamW's two moments
  # take twice the params, no more (they were once replicated on every device).
  m = re.search(r"\[grpo\] state: params ([\d.]+) KiB, optimizer ([\d.]+) KiB on each device "
                r"\(mesh data=4 fsdp=1 expert=2 tensor=1\)", out)
  assert m, out
  assert float(m.group(2)) <= 2 * float(m.group(1)) + 0.2, m.group(0)


def test_grpo_continuous_batching_splits_over_the_mesh(tmp_path, monkeypatch, capsys):
  """With rl.slots, a GRPO stage on (data 4, fsdp 2) runs continuous batching with the
  prompts split over the 8 devices, 2 slots on each, instead of one batcher whose
  slots every device would decode."""
  from r1jax.rl import trainer as trainer_lib
  from r1jax.sampling import continuous
  shard_rows, real_decode = [], continuous._decode

  def spy_decode(graphdef, state, c, *args, **kw):
    shard_rows.append(c["live"].sharding.shard_shape(c["live"].shape)[0])
    return real_decode(graphdef, state, c, *args, **kw)

  monkeypatch.setattr(continuous, "_decode", spy_decode)
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "stage=grpo", f"workdir={tmp_path}", "train.steps=1", "train.batch_size=8", "train.log_every=1",
      "train.seq_len=40", "data.n_train=64", "data.n_test=8", "eval.n=8", "eval.every=0",
      "rl.group_size=2", "rl.max_new_tokens=12", "rl.slots=16", "model.n_layers=2", "mesh.data=4",
      "mesh.fsdp=2"])
  config_lib.validate(config)
  summary = trainer_lib.run(config, str(tmp_path))
  assert shard_rows and max(shard_rows) == 2, shard_rows
  assert 0 <= summary["final_accuracy"] <= 1
  assert "[grpo] rollouts: 8 prompts split over 8 devices, continuous batching over 2 slots on each" in (
      capsys.readouterr().out)


def test_grpo_rollouts_split_over_the_batch_axes_with_tensor_parallelism(tmp_path, monkeypatch, capsys):
  """On (data 4, tensor 2) the GRPO stage's rollouts split the prompts over `data`, each
  batch shard decoding tensor-parallel, rather than each data shard decoding every row."""
  from r1jax.rl import trainer as trainer_lib
  from r1jax.sampling import sampler
  meshes, real_generate = [], sampler.generate

  def spy_generate(*args, **kw):
    meshes.append(None if kw.get("mesh") is None else dict(kw["mesh"].shape))
    return real_generate(*args, **kw)

  monkeypatch.setattr(trainer_lib, "generate", spy_generate)
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "stage=grpo", f"workdir={tmp_path}", "train.steps=1", "train.batch_size=8", "train.log_every=1",
      "train.seq_len=40", "data.n_train=64", "data.n_test=8", "eval.n=8", "eval.every=0",
      "rl.group_size=2", "rl.max_new_tokens=12", "model.n_layers=2", "mesh.data=4", "mesh.tensor=2"])
  config_lib.validate(config)
  summary = trainer_lib.run(config, str(tmp_path))
  assert meshes and meshes[0] == dict(data=4, fsdp=1, expert=1, tensor=2), meshes
  assert 0 <= summary["final_accuracy"] <= 1
  assert "[grpo] rollouts: 8 prompts split over 4 batch shards, each tensor-parallel over 2 devices" in (
      capsys.readouterr().out)
