"""launch/: the TPU VM scripts and the SLURM batch script, against fake gcloud / scontrol /
srun on PATH that record their arguments (and play a TPU's states), and shellcheck."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_vm.sh", "tpu_worker.sh", "slurm.sbatch", "common.sh"]

# gcloud as the scripts use it. Every call is appended to $FAKE/calls.jsonl. The TPU's
# state lives in $FAKE/state (absent: no TPU); $FAKE/state_queue holds states the next
# describes report in turn (then the last one stays). Runs of the trainer take their exit
# status from the lines of $FAKE/run_rcs in turn ("preempt:255" also preempts the TPU).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
"$FAKE_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE/calls.jsonl"
pop() {  # first line of file $1, removed from it
  [[ -s "$1" ]] || return 1
  head -n 1 "$1"
  tail -n +2 "$1" > "$1.tmp" && mv "$1.tmp" "$1"
}
args="$*"
case "$args" in
  *" describe "*)
    if s="$(pop "$FAKE/state_queue")"; then echo "$s" > "$FAKE/state"; fi
    [[ -f "$FAKE/state" ]] || { echo "NOT_FOUND" >&2; exit 1; }
    cat "$FAKE/state" ;;
  *"tpu-vm create "*) echo READY > "$FAKE/state" ;;
  *"queued-resources create "*) printf 'WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n' > "$FAKE/state_queue" ;;
  *" delete "*) rm -f "$FAKE/state" ;;
  *"tpu_worker.sh run "*)
    rc="$(pop "$FAKE/run_rcs" || echo 0)"
    if [[ "$rc" == preempt:* ]]; then echo PREEMPTED > "$FAKE/state"; rc="${rc#preempt:}"; fi
    exit "$rc" ;;
esac
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
set -euo pipefail
[[ "$1 $2" == "show hostnames" ]] || exit 1
printf 'gpu01\ngpu02\n'
"""

# srun: records its arguments, then runs the task command once per task with its
# SLURM_PROCID, as SLURM does on each node.
FAKE_SRUN = r"""#!/usr/bin/env bash
set -euo pipefail
"$FAKE_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE/srun.jsonl"
n=1
while [[ "$1" == -* ]]; do
  case "$1" in --ntasks=*) n="${1#--ntasks=}" ;; esac
  shift
done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@"; done
"""

# The "python" a task runs: writes its JAX_* environment and arguments for the test.
FAKE_TRAINER = r"""#!/usr/bin/env bash
"$FAKE_PYTHON" -c '
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}
with open(os.path.join(os.environ["FAKE"], "task_%s.json" % os.environ.get("JAX_PROCESS_ID", "x")), "w") as f:
  json.dump(dict(env=env, argv=sys.argv[1:], cwd=os.getcwd()), f)
print("trainer ran with", *sys.argv[1:])
' "$@"
if [[ -n "${FAKE_SLEEP:-}" ]]; then  # a long run; stopping it stops its sleep too
  sleep "$FAKE_SLEEP" &
  trap 'kill $!; exit 143' TERM
  wait
fi
"""


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


@pytest.fixture
def fake(tmp_path):
  """A bin folder with the fakes first on PATH, and the environment the scripts need."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write(bin_dir / "gcloud", FAKE_GCLOUD)
  _write(bin_dir / "scontrol", FAKE_SCONTROL)
  _write(bin_dir / "srun", FAKE_SRUN)
  _write(bin_dir / "trainer", FAKE_TRAINER)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "R1JAX_", "SLURM_", "JAX_"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE=str(tmp_path), FAKE_PYTHON=sys.executable,
             TMPDIR=str(tmp_path), HOME=str(tmp_path / "home"), TPU_NAME="r1", TPU_ZONE="us-east5-a",
             R1JAX_RETRY_DELAY="0", TPU_POLL_SECONDS="0")
  (tmp_path / "home").mkdir()
  return tmp_path, env


def _run(script, args, env, **kwargs):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, capture_output=True,
                        text=True, timeout=60, **kwargs)


def _calls(tmp, name="calls.jsonl"):
  path = tmp / name
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def _remote(call):
  """The command line a `tpu-vm ssh` call runs on the workers, split into words."""
  (command,) = [a for a in call if a.startswith("--command=")]
  return shlex.split(command[len("--command="):])


def _worker_flag(call):
  (flag,) = [a for a in call if a.startswith("--worker=")]
  return flag[len("--worker="):]


# ------------------------------------------------------------------------ tpu_vm.sh


@pytest.mark.parametrize("command", [["create", "--spot"], ["create", "--queued", "--spot"], ["setup"],
                                     ["run", "--", "--config", "c.py"], ["retry", "--", "--config", "c.py"],
                                     ["stop"], ["delete", "--queued"], ["status"], ["logs"]])
def test_dry_run_prints_commands_and_runs_none(fake, command):
  tmp, env = fake
  result = _run("tpu_vm.sh", [command[0], "--dry-run", *command[1:]], env)
  assert result.returncode == 0, result.stderr
  printed = [l for l in (result.stdout + result.stderr).splitlines() if l.startswith("+ ")]
  assert printed and any("gcloud compute tpus" in l for l in printed), result.stdout
  assert _calls(tmp) == []  # gcloud was never invoked


def test_create_spot_vm(fake):
  tmp, env = fake
  result = _run("tpu_vm.sh", ["create", "--spot", "--accelerator-type", "v5p-64", "--project", "p1"], env)
  assert result.returncode == 0, result.stderr
  create, describe = _calls(tmp)
  assert create == ["compute", "tpus", "tpu-vm", "create", "r1", "--zone=us-east5-a", "--project=p1",
                    "--version=v2-alpha-tpuv5", "--accelerator-type=v5p-64", "--spot"]
  assert describe[:5] == ["compute", "tpus", "tpu-vm", "describe", "r1"]


def test_create_queued_resource_waits_until_active(fake):
  tmp, env = fake
  env["TPU_QUEUED"], env["TPU_SPOT"] = "1", "1"
  result = _run("tpu_vm.sh", ["create", "--accelerator-type", "v6e-16"], env)
  assert result.returncode == 0, result.stderr
  calls = _calls(tmp)
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "r1-qr", "--zone=us-east5-a",
                      "--node-id=r1", "--runtime-version=v2-alpha-tpuv6e", "--accelerator-type=v6e-16",
                      "--spot"]
  describes = calls[1:]
  assert len(describes) == 3 and all(c[3] == "describe" for c in describes)
  assert "--format=value(state.state)" in describes[0]
  assert "WAITING_FOR_RESOURCES" in result.stderr and "is ready" in result.stderr


def test_bad_flags_and_missing_values_exit_2(fake):
  _, env = fake
  assert _run("tpu_vm.sh", ["create", "--bogus"], env).returncode == 2
  del env["TPU_NAME"]
  result = _run("tpu_vm.sh", ["create"], env)
  assert result.returncode == 2 and "TPU_NAME" in result.stderr
  assert _run("tpu_vm.sh", ["--help"], env).returncode == 0


def test_setup_copies_the_checkout_to_every_worker_and_installs(fake):
  tmp, env = fake
  result = _run("tpu_vm.sh", ["setup", "--workdir", "gs://bkt/runs/x"], env)
  assert result.returncode == 0, result.stderr
  scp, ssh = _calls(tmp)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "r1:r1jax.tar.gz"
  assert _worker_flag(scp) == "all" and _worker_flag(ssh) == "all"
  with tarfile.open(scp[4]) as tar:
    names = set(tar.getnames())
  assert {"launch/tpu_worker.sh", "r1jax/train.py", "pyproject.toml"} <= names
  assert not any(n.startswith((".git/", ".venv/")) for n in names)
  remote = " ".join(_remote(ssh))
  assert "tar -xzf r1jax.tar.gz -C r1jax" in remote
  assert "r1jax/launch/tpu_worker.sh install --extra tpu" in remote
  assert "r1jax/launch/tpu_worker.sh mount --workdir gs://bkt/runs/x" in remote


def test_setup_from_git(fake):
  tmp, env = fake
  result = _run("tpu_vm.sh", ["setup", "--source", "git", "--git-url", "https://example.com/r1jax.git",
                              "--git-ref", "v1"], env)
  assert result.returncode == 0, result.stderr
  (ssh,) = _calls(tmp)
  remote = " ".join(_remote(ssh))
  assert "git clone --quiet https://example.com/r1jax.git r1jax" in remote
  assert "checkout --quiet v1" in remote and "install --extra tpu" in remote and "mount" not in remote


def test_run_sends_the_same_command_to_all_workers(fake):
  tmp, env = fake
  env["R1JAX_ENV"] = "LIBTPU_INIT_ARGS=--xla_tpu_foo=true"
  args = ["--config", "configs/r1_zero_deepseek_v3.py", "--config.data.path=/data/it's here.jsonl"]
  result = _run("tpu_vm.sh", ["run", "--workdir", "gs://bkt/runs/x", "--", *args], env)
  assert result.returncode == 0, result.stderr
  (ssh,) = _calls(tmp)
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "r1"] and _worker_flag(ssh) == "all"
  assert _remote(ssh) == ["bash", "r1jax/launch/tpu_worker.sh", "run", "--workdir", "gs://bkt/runs/x",
                          "--gcsfuse", "1", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_foo=true", "--", *args]


def test_logs_ssh_stop_delete(fake):
  tmp, env = fake
  for args in (["logs", "--worker", "3"], ["ssh", "--command", "uptime"], ["stop"], ["delete"],
               ["delete", "--queued"]):
    assert _run("tpu_vm.sh", args, env).returncode == 0
  logs, ssh, stop, delete, delete_qr = _calls(tmp)
  assert _worker_flag(logs) == "3" and _remote(logs)[-2:] == ["logs", "--follow"]
  assert _worker_flag(ssh) == "all" and _remote(ssh) == ["uptime"]
  assert _worker_flag(stop) == "all" and _remote(stop)[-1] == "stop"
  assert delete[:5] == ["compute", "tpus", "tpu-vm", "delete", "r1"] and "--quiet" in delete
  assert delete_qr[:5] == ["compute", "tpus", "queued-resources", "delete", "r1-qr"] and "--force" in delete_qr


def _kinds(calls):
  """A compact trace: create / delete / describe / scp / setup / run / stop."""
  out = []
  for c in calls:
    if c[3] == "ssh":
      words = _remote(c)
      out.append("run" if "run" in words else "stop" if "stop" in words else "setup")
    else:
      out.append(c[3])
  return out


def test_retry_recreates_a_preempted_queued_resource_and_reruns(fake):
  tmp, env = fake
  env["TPU_QUEUED"] = "1"
  (tmp / "state").write_text("ACTIVE\n")
  (tmp / "run_rcs").write_text("preempt:255\n0\n")
  result = _run("tpu_vm.sh", ["retry", "--", "--config", "c.py"], env)
  assert result.returncode == 0, result.stderr
  trace = _kinds(_calls(tmp))
  assert trace == ["describe", "run", "describe", "describe", "delete", "create", "describe", "describe",
                   "describe", "scp", "setup", "run"], trace
  delete = [c for c in _calls(tmp) if c[3] == "delete"][0]
  assert delete[2] == "queued-resources" and "--force" in delete
  assert "recreating" in result.stderr and "run finished" in result.stderr


def test_retry_stops_a_stale_run_on_a_healthy_tpu_then_gives_up_after_max_retries(fake):
  tmp, env = fake
  (tmp / "state").write_text("READY\n")
  (tmp / "run_rcs").write_text("1\n1\n1\n1\n")
  result = _run("tpu_vm.sh", ["retry", "--max-retries", "2", "--", "--config", "c.py"], env)
  assert result.returncode == 1
  trace = _kinds(_calls(tmp))
  assert trace.count("run") == 3 and trace.count("stop") == 2 and "create" not in trace, trace
  assert "giving up" in result.stderr


def test_retry_does_not_retry_bad_input(fake):
  tmp, env = fake
  (tmp / "state").write_text("READY\n")
  (tmp / "run_rcs").write_text("2\n0\n")
  result = _run("tpu_vm.sh", ["retry", "--", "--config", "c.py"], env)
  assert result.returncode == 2 and _kinds(_calls(tmp)).count("run") == 1


# -------------------------------------------------------------------- tpu_worker.sh


def test_worker_run_sets_the_environment_and_logs(fake):
  tmp, env = fake
  env.update(R1JAX_PYTHON=str(tmp / "bin" / "trainer"), R1JAX_MOUNT_ROOT="/mnt/gcs",
             R1JAX_LOG_DIR=str(tmp / "logs"))
  result = _run("tpu_worker.sh", ["run", "--workdir", "gs://bkt/runs/x", "--env", "XLA_FLAGS=--foo",
                                  "--", "--config", "a b.py", "--config.data.path=gs://bkt/data/t.jsonl",
                                  "--config.data.test_path=gs://other/t.jsonl"], env)
  assert result.returncode == 0, result.stderr
  task = json.loads((tmp / "task_x.json").read_text())
  assert task["argv"] == ["-m", "r1jax.train", "--config", "a b.py", "--config.data.path=/mnt/gcs/bkt/data/t.jsonl",
                          "--config.data.test_path=gs://other/t.jsonl", "--config.workdir=/mnt/gcs/bkt/runs/x"]
  assert task["env"]["JAX_DISTRIBUTED"] == "1" and task["env"]["XLA_FLAGS"] == "--foo"
  assert task["cwd"] == ROOT
  deadline = time.time() + 10  # tee writes the log asynchronously
  while "trainer ran with" not in (tmp / "logs" / "train.log").read_text() and time.time() < deadline:
    time.sleep(0.1)
  log = (tmp / "logs" / "train.log").read_text()
  assert log.startswith("=== ") and "trainer ran with -m r1jax.train" in log
  # --gcsfuse 0 passes the bucket path through.
  out = _run("tpu_worker.sh", ["workdir", "--workdir", "gs://bkt/runs/x", "--gcsfuse", "0"], env)
  assert out.stdout.strip() == "gs://bkt/runs/x"


def test_worker_detach_then_stop(fake):
  tmp, env = fake
  env.update(R1JAX_PYTHON=str(tmp / "bin" / "trainer"), R1JAX_LOG_DIR=str(tmp / "logs"), FAKE_SLEEP="60")
  result = _run("tpu_worker.sh", ["run", "--detach", "--", "--config", "c.py"], env)
  assert result.returncode == 0 and "background" in result.stdout
  pid_file = tmp / "logs" / "train.pid"
  deadline = time.time() + 20
  while not (tmp / "task_x.json").exists() and time.time() < deadline:
    time.sleep(0.1)
  pid = int(pid_file.read_text())
  os.kill(pid, 0)  # running
  again = _run("tpu_worker.sh", ["run", "--", "--config", "c.py"], env)
  assert again.returncode == 2 and "already going" in again.stderr
  stop = _run("tpu_worker.sh", ["stop"], env)
  assert stop.returncode == 0 and f"stopped pid {pid}" in stop.stdout
  deadline = time.time() + 10
  while _alive(pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not _alive(pid)


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"  # a zombie awaiting its parent counts as gone
  except FileNotFoundError:
    return False


def test_worker_dry_run_install_and_mount(fake):
  _, env = fake
  result = _run("tpu_worker.sh", ["install", "--dry-run"], env)
  assert result.returncode == 0
  assert f"+ {ROOT}/.venv/bin/pip install --quiet -e '{ROOT}[tpu]'" in result.stdout
  result = _run("tpu_worker.sh", ["mount", "--dry-run", "--workdir", "gs://bkt/x"], env)
  assert result.returncode == 0
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt" in result.stdout


# ------------------------------------------------------------------------ slurm.sbatch


def _slurm_env(env):
  return dict(env, SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
              SLURM_SUBMIT_DIR=ROOT)


def test_slurm_one_process_per_node_with_coordinator_from_the_node_list(fake):
  tmp, env = fake
  env = _slurm_env(env)
  env["R1JAX_PYTHON"] = str(tmp / "bin" / "trainer")
  env["R1JAX_ENV"] = "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
  args = ["--config", "configs/r1_zero_qwen2_5_math_1_5b.py", "--config.workdir=/shared/runs/a b"]
  result = _run("slurm.sbatch", args, env)
  assert result.returncode == 0, result.stderr
  (srun,) = _calls(tmp, "srun.jsonl")
  assert srun[:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  for i in range(2):
    task = json.loads((tmp / f"task_{i}.json").read_text())
    assert task["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu01:24242"  # 20000 + 4242 % 10000
    assert task["env"]["JAX_NUM_PROCESSES"] == "2" and task["env"]["JAX_PROCESS_ID"] == str(i)
    assert task["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert task["argv"] == ["-m", "r1jax.train", *args] and task["cwd"] == ROOT


def test_slurm_dry_run_and_errors(fake):
  tmp, env = fake
  result = _run("slurm.sbatch", ["--config", "c.py"], dict(_slurm_env(env), R1JAX_DRY_RUN="1",
                                                           R1JAX_COORDINATOR_PORT="9999"))
  assert result.returncode == 0, result.stderr
  assert "JAX_COORDINATOR_ADDRESS=gpu01:9999" in result.stdout and "+ srun --nodes=2" in result.stdout
  assert _calls(tmp, "srun.jsonl") == []
  assert _run("slurm.sbatch", ["--config", "c.py"], env).returncode == 2  # no allocation
  bad = dict(_slurm_env(env), SLURM_NNODES="3")
  result = _run("slurm.sbatch", ["--config", "c.py"], bad)
  assert result.returncode == 2 and "node list has 2" in result.stderr


# -------------------------------------------------------------------------- shellcheck


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "--shell=bash", *[os.path.join(LAUNCH, s) for s in SCRIPTS]],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
