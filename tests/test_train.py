"""The train CLI as a user runs it: a tiny pipeline end to end, resume after kill -9,
non-finite stops, and bad input (one message, non-zero exit, nothing overwritten)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

TINY = ["--config.train.batch_size=8", "--config.train.log_every=1", "--config.data.n_train=256",
        "--config.data.n_test=16", "--config.eval.n=16", "--config.rl.group_size=4",
        "--config.rl.max_new_tokens=24", "--config.train.seq_len=40"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device, like a user's plain run
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _train(*args, cwd, check=True, timeout=600):
  result = subprocess.run([sys.executable, "-m", "r1jax.train", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(result.stdout[-2000:] + result.stderr[-3000:])
  return result


def _params(workdir):
  from r1jax import checkpoint
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  import orbax.checkpoint as ocp
  raw = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  import jax
  return mgr.latest_step(), [np.asarray(x) for x in jax.tree.leaves(raw["params"])]


def test_pipeline_end_to_end_writes_everything(tmp_path):
  wd = tmp_path / "run"
  result = _train("--config.stage=pipeline", "--config.stages=pretrain,grpo", f"--config.workdir={wd}",
                  "--config.per_stage.pretrain=train.steps=6", "--config.per_stage.grpo=train.steps=2",
                  *TINY, cwd=tmp_path)
  summary = json.loads((wd / "summary.json").read_text())
  for key in ("base_accuracy", "final_accuracy", "wall_seconds"):
    assert key in summary
  assert 0.0 <= summary["final_accuracy"] <= 1.0
  rows = [json.loads(l) for l in (wd / "1_grpo" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("reward_mean", "reward_std", "accuracy", "completion_len_mean", "completion_len_max",
              "clipped_frac", "clip_frac", "entropy", "zero_variance_frac", "grad_norm", "tokens_per_s",
              "kl"):
    assert key in rows[0], key
  assert (wd / "1_grpo" / "reward_mean.png").exists()
  assert "after RL" in result.stdout
  assert list((wd / "1_grpo" / "tb").iterdir())
  # The eval CLI on the result.
  out = subprocess.run([sys.executable, "-m", "r1jax.eval", "--checkpoint", str(wd / "1_grpo"),
                        f"--config.workdir={wd}", *TINY, "--config.eval.k=2", "--config.eval.temperature=1.0"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(figures) >= {"pass@1", "cons@2", "pass@2"}
  assert figures["pass@2"] >= figures["pass@1"]


def test_resume_after_kill9_is_bit_identical(tmp_path):
  common = ["--config.stage=pretrain", "--config.train.steps=24", "--config.train.checkpoint_every=4",
            *TINY]
  _train(*common, f"--config.workdir={tmp_path / 'straight'}", cwd=tmp_path)
  wd = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "r1jax.train", *common, f"--config.workdir={wd}"],
                          cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  ckpts = wd / "checkpoints"
  while time.time() < deadline:  # kill as soon as a second checkpoint is complete
    if ckpts.exists() and len([p for p in ckpts.iterdir() if p.name.isdigit()]) >= 2:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  step_at_kill, _ = _params(wd)
  assert step_at_kill < 24
  result = _train(*common, f"--config.workdir={wd}", cwd=tmp_path)
  assert f"resumed from {wd} at step" in result.stdout
  step_a, straight = _params(tmp_path / "straight")
  step_b, resumed = _params(wd)
  assert step_a == step_b == 24
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_updates_stop_the_run_with_a_message(tmp_path):
  wd = tmp_path / "nan"
  result = _train("--config.stage=pretrain", "--config.train.steps=40", "--config.optim.lr=1e30",
                  "--config.optim.warmup_steps=0", "--config.train.checkpoint_every=1",
                  f"--config.workdir={wd}", *TINY, cwd=tmp_path, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "consecutive non-finite steps" in result.stderr and "Traceback" not in result.stderr
  step, params = _params(wd)  # the last checkpoint is intact and readable
  assert step >= 1 and all(np.isfinite(p).all() for p in params)


def test_bad_input_is_refused_without_touching_the_workdir(tmp_path):
  wd = tmp_path / "shape"
  _train("--config.stage=pretrain", "--config.train.steps=2", f"--config.workdir={wd}", *TINY, cwd=tmp_path)
  before = sorted(p.name for p in (wd / "checkpoints").iterdir())
  result = _train("--config.stage=pretrain", "--config.train.steps=4", "--config.model.d_model=32",
                  f"--config.workdir={wd}", *TINY, cwd=tmp_path, check=False)
  assert result.returncode == 2 and "holds a checkpoint of a different model" in result.stderr
  assert "d_model" in result.stderr and "Traceback" not in result.stderr
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before

  result = _train("--config.stage=pretrain", f"--config.data.path={tmp_path / 'nope.jsonl'}",
                  f"--config.workdir={tmp_path / 'x'}", *TINY, cwd=tmp_path, check=False)
  assert result.returncode == 2 and "nope.jsonl" in result.stderr and "Traceback" not in result.stderr
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  result = _train("--config.stage=pretrain", f"--config.data.path={empty}",
                  f"--config.workdir={tmp_path / 'y'}", *TINY, cwd=tmp_path, check=False)
  assert result.returncode == 2 and "empty.jsonl" in result.stderr and "Traceback" not in result.stderr


def _kill_when(proc, ready, timeout=300):
  """SIGKILLs proc as soon as ready() holds (or fails the test if it never does)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if ready():
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before the kill point: make it longer"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def _steps_saved(ckpts):
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_pipeline_resumes_after_kill_between_and_within_stages(tmp_path):
  """pretrain -> sft killed (a) as soon as the pretrain stage is complete, before sft has a
  checkpoint, and (b) inside sft after its first checkpoint; each rerun of the same command
  finishes with the sft weights of an uninterrupted run, bit for bit."""
  common = ["--config.stages=pretrain,sft", "--config.per_stage.pretrain=train.steps=8",
            "--config.per_stage.sft=train.steps=24", "--config.train.checkpoint_every=4", *TINY]
  _train(*common, f"--config.workdir={tmp_path / 'straight'}", cwd=tmp_path)
  _, want = _params(tmp_path / "straight" / "1_sft")
  kill_points = {
      "between": lambda wd: 8 in _steps_saved(wd / "0_pretrain" / "checkpoints"),
      "within": lambda wd: len(_steps_saved(wd / "1_sft" / "checkpoints")) >= 1,
  }
  for name, ready in kill_points.items():
    wd = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-m", "r1jax.train", *common, f"--config.workdir={wd}"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda wd=wd, ready=ready: ready(wd))
    assert 24 not in _steps_saved(wd / "1_sft" / "checkpoints"), name
    result = _train(*common, f"--config.workdir={wd}", cwd=tmp_path)
    assert f"resumed from {wd / '0_pretrain'} at step 8" in result.stdout, name
    step, got = _params(wd / "1_sft")
    assert step == 24, name
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a, b, err_msg=name)
