"""configs/distill_vs_rl.py end to end through the CLI, every stage shrunk to a few steps:
the teacher, its rejection samples, the student base, the distilled and the RL student,
and summary.json carrying the experiment's figures."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from r1jax import config as config_lib
from r1jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "distill_vs_rl.py")


def _module():
  spec = importlib.util.spec_from_file_location("distill_vs_rl", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_students_get_the_same_training_flops():
  m = _module()
  c = m.get_config()
  config_lib.validate(c)
  names = c.stages.split(",")
  stages = [train._stage_config(c, n, names[:i].count(n)) for i, n in enumerate(names)]  # pylint: disable=protected-access
  (sft, sft_init), (rl, rl_init) = stages[4], stages[5]
  assert sft_init == rl_init == "3" and stages[3][1] == "none"
  assert sft.model.to_dict() == rl.model.to_dict() != stages[0][0].model.to_dict()
  seq = c.train.seq_len  # both sides train on rows of seq_len positions
  grpo_forwards = rl.train.steps * c.train.batch_size * c.rl.group_size * 5 * seq
  sft_forwards = sft.train.steps * c.train.batch_size * 3 * seq
  assert abs(grpo_forwards / sft_forwards - 1) < 0.01


def test_bad_summary_keys_are_refused():
  with pytest.raises(config_lib.ConfigError, match="name=STAGE_INDEX"):
    train.parse_summary_keys("teacher_accuracy=final_accuracy")
  assert train.summary_extras("a=0.x.y,b=1.z", [{"x": {"y": 3}}]) == {"a": 3, "b": None}


def test_distill_vs_rl_pipeline_writes_the_comparison(tmp_path):
  m = _module()
  student = m.STUDENT
  # A teacher trained for 3 steps verifies nothing, so the student distils from a stand-in
  # file here (the rejection -> sft hand-over itself is tested in test_r1_pipeline.py).
  traces = tmp_path / "traces.jsonl"
  traces.write_text("".join(json.dumps(dict(prompt=f"{a}+{b}", solution=f"{a}+{b}={a + b}", answer=str(a + b)))
                            + "\n" for a in range(3) for b in range(3)))
  args = [
      "--config", CONFIG, f"--config.workdir={tmp_path / 'run'}",
      "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
      "--config.rl.group_size=2", "--config.rl.max_new_tokens=24", "--config.train.seq_len=48",
      "--config.data.n_train=32", "--config.eval.n=4", "--config.eval.k=2",
      "--config.rejection.n_prompts=8", "--config.rejection.n_samples=2", "--config.rejection.batch_prompts=4",
      "--config.rejection.max_chars=0", "--config.rl.reward_workers=1",
      f"--config.per_stage.pretrain=train.steps=2;train.steps=2,train.init_from=none,{student}",
      f"--config.per_stage.grpo=train.steps=1;train.steps=1,train.init_from=3,{student}",
      "--config.rejection.handover=false",
      f"--config.per_stage.sft=train.steps=2,train.init_from=3,data.pack=true,data.path={traces},{student}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "r1jax.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  for key in ("teacher_accuracy", "distilled_student_accuracy", "rl_student_accuracy",
              "student_base_accuracy", "teacher_cons@4"):
    assert key in summary, key
  for key in ("teacher_accuracy", "distilled_student_accuracy", "rl_student_accuracy"):
    assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
  stages = summary["stages"]
  assert [s["stage"] for s in stages] == ["pretrain", "grpo", "rejection_sampling", "pretrain", "sft", "grpo"]
  assert stages[4]["data_path"] == str(traces) and "final_eval" in stages[4]
  assert (tmp_path / "run" / "2_rejection_sampling" / "data").is_dir()
