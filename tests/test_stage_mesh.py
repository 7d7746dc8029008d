"""Stage loops trace their steps under the mesh: with mesh.expert > 1 the MoE layers of a
real training stage run expert-parallel (shard_map + all_to_all), not only in unit tests."""

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
