"""`python -m r1jax.train` in two processes x 4 CPU devices == in one process x 8 devices.

The stage loops as a user launches them on two hosts: two copies of the CLI join one
jax.distributed cluster on loopback (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, as launch/ sets them; gloo collectives on CPU) and run a pretrain -> grpo
pipeline into one shared workdir, on a (data 2, fsdp 2, expert 1, tensor 2) mesh whose
data axis spans the two processes; the GRPO stage moves to (data 2, fsdp 4, tensor 1),
so its rollouts split their prompts over all 8 devices of both processes. Meanwhile the same command runs in one process with 8
devices. Every process reads the whole global batch and feeds its own rows
(parallel.put_global_batch), and device outputs are read whole on every host
(parallel.to_host), so the two runs must log the same losses and rewards and end with the
same weights. With per-host shards of the data instead, feeding rows this way changes the
batches (the first logged loss differs), and jax.device_put of each host's batch is
refused by JAX (the hosts' copies differ); both make this test fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

N_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 900
# A tiny dense model and short sequences: the cost is mostly compilation, paid by three
# processes at once (two workers and the reference) on a CPU.
ARGS = ["--config.stage=pipeline", "--config.stages=pretrain,grpo",
        "--config.per_stage.pretrain=train.steps=3",
        # GRPO on (data 2, fsdp 4, tensor 1): its rollouts split the 8 prompts over the
        # mesh's devices in both processes (parallel.rollout_mesh).
        "--config.per_stage.grpo=train.steps=2,train.batch_size=8,mesh.fsdp=4,mesh.tensor=1",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=1",
        "--config.mesh.tensor=2",
        "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=2", "--config.model.head_dim=16", "--config.model.d_ff=64",
        "--config.train.batch_size=8", "--config.train.seq_len=24", "--config.train.log_every=1",
        "--config.train.mtp_weight=0.0",
        "--config.data.n_train=64", "--config.data.n_test=8", "--config.eval.n=4",
        "--config.eval.k=2", "--config.rl.group_size=4", "--config.rl.max_new_tokens=12",
        # A model this young earns no accuracy or format reward; DAPO's overlong penalty
        # (on the last 8 of 12 tokens) varies within groups, so the GRPO steps update.
        "--config.rl.overlong_buffer=8"]
# Per-step figures that depend only on the computation (not timings).
COMPARED = ("loss", "grad_norm", "nll", "tokens", "reward_mean", "reward_std", "accuracy",
            "format", "completion_len_mean", "completion_len_max", "n_tokens", "pg_loss", "kl",
            "entropy", "clip_frac", "zero_variance_frac")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, port: int | None = None, process_id: int | None = None) -> dict:
  env = dict(os.environ)
  # Replace the pytest process's 8-device flag (tests/conftest.py) with this run's count.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_DISTRIBUTED"):
    env.pop(key, None)
  if port is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(N_PROCESSES),
               JAX_PROCESS_ID=str(process_id))
  return env


def _tail(path: str, n: int = 30) -> str:
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if not l.startswith(("W0", "I0", "[Gloo]"))]
  return "\n".join(lines[-n:])


def _start_workers(workdir: str, logs: str) -> list:
  port = _free_port()
  procs = []
  for i in range(N_PROCESSES):
    with open(os.path.join(logs, f"worker_{i}.log"), "w") as log:
      procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-m", "r1jax.train", *ARGS, f"--config.workdir={workdir}"],
          env=_env(LOCAL_DEVICES, port, i), stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, logs: str) -> None:
  """Waits for every worker; on the first failure or the deadline, kills the others (a
  worker whose peer died would wait at its next collective)."""
  deadline = time.time() + TIMEOUT_S
  while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  if any(p.returncode != 0 for p in procs):
    raise AssertionError("two-process run failed:\n" + "\n".join(
        f"--- worker {i} (rc {p.returncode}):\n{_tail(os.path.join(logs, f'worker_{i}.log'))}"
        for i, p in enumerate(procs)))


def _final_params(stage_dir: str) -> tuple[int, list[np.ndarray]]:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from r1jax import checkpoint  # pylint: disable=import-outside-toplevel
  mgr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"))
  step = mgr.latest_step()
  # Onto one device here: the saved shardings name the two-process run's devices.
  whole = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  raw = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(fallback_sharding=whole)))["state"]
  return step, [np.asarray(x) for x in jax.tree.leaves(raw["params"])]


def _metrics(stage_dir: str) -> list[dict]:
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_cli_in_two_processes_matches_one_process(tmp_path):
  multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  logs = str(tmp_path)
  procs = _start_workers(multi, logs)
  try:
    ref = subprocess.run([sys.executable, "-m", "r1jax.train", *ARGS, f"--config.workdir={single}"],
                         env=_env(N_PROCESSES * LOCAL_DEVICES), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
  finally:
    _wait(procs, logs)
  assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
  for i in range(N_PROCESSES):
    log = _tail(os.path.join(logs, f"worker_{i}.log"), 10_000)
    assert f"process {i} of {N_PROCESSES}: {LOCAL_DEVICES} local of 8 devices" in log
    assert "[grpo] rollouts: 8 prompts split over 8 devices" in log

  for stage, steps in (("0_pretrain", 3), ("1_grpo", 2)):
    got, want = _metrics(os.path.join(multi, stage)), _metrics(os.path.join(single, stage))
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for g, w in zip(got, want):
      keys = [k for k in COMPARED if k in w]
      assert keys and set(keys) <= set(g), (stage, keys, sorted(g))
      np.testing.assert_allclose([g[k] for k in keys], [w[k] for k in keys], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{stage} step {w['step']}: {keys}")
    step_got, params_got = _final_params(os.path.join(multi, stage))
    step_want, params_want = _final_params(os.path.join(single, stage))
    assert step_got == step_want == steps
    for g, w in zip(params_got, params_want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=stage)

  # One summary (process 0's), with the same held-out figures as the one-process run.
  got, want = (json.loads((tmp_path / d / "summary.json").read_text())
               for d in ("two_processes", "one_process"))
  assert got["final_accuracy"] == want["final_accuracy"]
  assert got["stages"][1]["final_eval"] == want["stages"][1]["final_eval"]
