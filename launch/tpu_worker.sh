#!/usr/bin/env bash
# The per-host half of launch/tpu_vm.sh: runs ON each TPU VM worker (tpu_vm.sh calls it
# through `gcloud compute tpus tpu-vm ssh --worker=all`), or by hand on any host.
#
#   tpu_worker.sh install                     venv + pip install -e ".[tpu]" of this checkout
#   tpu_worker.sh mount --workdir gs://B/P    mount bucket B with gcsfuse (installs it if needed)
#   tpu_worker.sh run [--detach] [--workdir W] -- TRAIN_ARGS...
#                                             python -m r1jax.train TRAIN_ARGS --config.workdir=W
#   tpu_worker.sh stop                        stop the run this host started (its pid file)
#   tpu_worker.sh logs [--follow]             this host's training log
#
# Every value is a flag or an environment variable (flag wins):
#   --dir        R1JAX_DIR         the r1jax checkout (default: the folder above this script)
#   --venv       R1JAX_VENV        virtual environment (default: $R1JAX_DIR/.venv)
#   --python     R1JAX_PYTHON      interpreter for the run (default: $R1JAX_VENV/bin/python)
#   --extra      R1JAX_PIP_EXTRA   pip extra to install (default: tpu; gpu on GPU hosts)
#   --pip-args   R1JAX_PIP_ARGS    more pip install arguments (default: none)
#   --workdir    R1JAX_WORKDIR     run directory; gs://BUCKET/PATH is used through a gcsfuse
#                                  mount at $R1JAX_MOUNT_ROOT/BUCKET/PATH unless --gcsfuse 0,
#                                  and so are --config.KEY=gs://BUCKET/... train arguments
#   --gcsfuse    R1JAX_GCSFUSE     1 (default): mount gs:// workdirs; 0: pass gs:// through
#   --mount-root R1JAX_MOUNT_ROOT  where buckets are mounted (default: $HOME/gcs)
#   --log-dir    R1JAX_LOG_DIR     training log and pid file (default: $HOME/r1jax-logs)
#   --env        R1JAX_ENV         extra "KEY=VALUE KEY=VALUE" for the run
#   --distributed R1JAX_JAX_DISTRIBUTED  JAX_DISTRIBUTED for the run (default 1: every host
#                                  calls jax.distributed.initialize(), which finds the pod)
#   --detach     R1JAX_DETACH      1: start in the background (nohup) and return
#   --follow     R1JAX_FOLLOW      1: logs keeps following (tail -f)
#   --dry-run    R1JAX_DRY_RUN     1: print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_worker.sh: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"  # quote, x
dir="${R1JAX_DIR:-$(dirname "$here")}"
venv="${R1JAX_VENV:-}"
python="${R1JAX_PYTHON:-}"
extra="${R1JAX_PIP_EXTRA:-tpu}"
pip_args="${R1JAX_PIP_ARGS:-}"
workdir="${R1JAX_WORKDIR:-}"
gcsfuse="${R1JAX_GCSFUSE:-1}"
mount_root="${R1JAX_MOUNT_ROOT:-$HOME/gcs}"
log_dir="${R1JAX_LOG_DIR:-$HOME/r1jax-logs}"
extra_env="${R1JAX_ENV:-}"
distributed="${R1JAX_JAX_DISTRIBUTED:-1}"
detach="${R1JAX_DETACH:-0}"
follow="${R1JAX_FOLLOW:-0}"
dry_run="${R1JAX_DRY_RUN:-0}"

[[ $# -ge 1 ]] || { usage; exit 2; }
cmd="$1"
shift
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --extra) extra="$2"; shift 2 ;;
    --pip-args) pip_args="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --gcsfuse) gcsfuse="$2"; shift 2 ;;
    --mount-root) mount_root="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --env) extra_env="$2"; shift 2 ;;
    --distributed) distributed="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown flag $1 (train arguments go after --)" ;;
  esac
done
venv="${venv:-$dir/.venv}"
python="${python:-$venv/bin/python}"
log_file="$log_dir/train.log"
pid_file="$log_dir/train.pid"

# gs://BUCKET/PATH -> BUCKET (empty for other paths).
bucket_of() {
  if [[ "$1" == gs://* ]]; then
    local b="${1#gs://}"
    echo "${b%%/*}"
  fi
}

# The path the trainer writes to: gs:// workdirs go through the gcsfuse mount.
local_workdir() {
  local bucket
  bucket="$(bucket_of "$1")"
  if [[ -n "$bucket" && "$gcsfuse" == 1 ]]; then
    echo "$mount_root/$bucket${1#gs://"$bucket"}"
  else
    echo "$1"
  fi
}

running_pid() {
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  # Alive and still the trainer (a pid can be reused after a reboot).
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  grep -qa r1jax.train "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

do_install() {
  [[ -f "$dir/pyproject.toml" ]] || die "$dir has no pyproject.toml (--dir / R1JAX_DIR)"
  [[ -x "$venv/bin/python" ]] || x python3 -m venv "$venv"
  x "$venv/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086  # R1JAX_PIP_ARGS is a list of arguments
  x "$venv/bin/pip" install --quiet ${pip_args} -e "${dir}[${extra}]"
}

do_mount() {
  local bucket target
  bucket="$(bucket_of "$workdir")"
  [[ -n "$bucket" ]] || die "mount needs --workdir gs://BUCKET/PATH (got '${workdir}')"
  [[ "$gcsfuse" == 1 ]] || { echo "gcsfuse off: the run writes to $workdir directly"; return 0; }
  target="$mount_root/$bucket"
  if ! command -v gcsfuse >/dev/null; then
    # Google's apt repository for gcsfuse (https://cloud.google.com/storage/docs/gcsfuse-install).
    x sudo mkdir -p /etc/apt/keyrings
    x sudo curl -fsSL -o /etc/apt/keyrings/gcsfuse.asc https://packages.cloud.google.com/apt/doc/apt-key.gpg
    x sudo sh -c "echo \"deb [signed-by=/etc/apt/keyrings/gcsfuse.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" > /etc/apt/sources.list.d/gcsfuse.list"
    x sudo apt-get update -qq
    x sudo apt-get install -y -qq gcsfuse
  fi
  x mkdir -p "$target"
  if [[ "$dry_run" != 1 ]] && mountpoint -q "$target"; then
    echo "gs://$bucket already mounted at $target"
    return 0
  fi
  # --implicit-dirs: see folders other hosts created; --rename-dir-limit: orbax commits a
  # checkpoint by renaming its temporary folder, which gcsfuse does object by object.
  x gcsfuse --implicit-dirs --rename-dir-limit=1000000 "$bucket" "$target"
}

do_run() {
  local pid
  if pid="$(running_pid)"; then
    die "a run is already going on this host (pid $pid); stop it first (tpu_worker.sh stop)"
  fi
  if [[ "$detach" == 1 ]]; then
    local forward=(run --dir "$dir" --python "$python" --workdir "$workdir" --gcsfuse "$gcsfuse"
      --mount-root "$mount_root" --log-dir "$log_dir" --env "$extra_env"
      --distributed "$distributed" -- "${train_args[@]}")
    if [[ "$dry_run" == 1 ]]; then
      x env R1JAX_DETACH=0 nohup bash "$0" "${forward[@]}"
      return 0
    fi
    mkdir -p "$log_dir"
    env R1JAX_DETACH=0 nohup bash "$0" "${forward[@]}" >/dev/null 2>&1 &
    echo "started in the background; log: $log_file (tpu_worker.sh logs --follow)"
    return 0
  fi
  # Other gs:// values in the workdir's bucket (data, tokenizer) are read through the
  # same mount: --config.data.path=gs://B/data/train.jsonl -> $R1JAX_MOUNT_ROOT/B/data/...
  local args=() arg bucket
  bucket="$(bucket_of "$workdir")"
  for arg in "${train_args[@]}"; do
    if [[ -n "$bucket" && "$arg" == --config.*=gs://"$bucket"/* ]]; then
      arg="${arg%%=*}=$(local_workdir "${arg#*=}")"
    fi
    args+=("$arg")
  done
  [[ -z "$workdir" ]] || args+=("--config.workdir=$(local_workdir "$workdir")")
  local envs=("JAX_DISTRIBUTED=$distributed")
  local kv
  for kv in $extra_env; do
    [[ "$kv" == *=* ]] || die "--env / R1JAX_ENV entries must be KEY=VALUE (got '$kv')"
    envs+=("$kv")
  done
  if [[ "$dry_run" == 1 ]]; then
    x cd "$dir"
    x env "${envs[@]}" "$python" -m r1jax.train "${args[@]}"
    return 0
  fi
  mkdir -p "$log_dir"
  cd "$dir"
  echo "=== $(date -u +%FT%TZ) $(hostname): python -m r1jax.train ${args[*]}" >> "$log_file"
  # The pid file names this shell, which exec turns into the trainer (for `stop`).
  echo "$$" > "$pid_file"
  exec env "${envs[@]}" "$python" -m r1jax.train "${args[@]}" > >(tee -a "$log_file") 2>&1
}

do_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    echo "no run going on $(hostname)"
    return 0
  fi
  x kill -TERM "$pid"
  [[ "$dry_run" == 1 ]] && return 0
  local waited=0
  while kill -0 "$pid" 2>/dev/null && [[ $waited -lt 60 ]]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid"
  fi
  echo "stopped pid $pid on $(hostname)"
}

do_logs() {
  [[ -f "$log_file" ]] || die "no log at $log_file yet"
  if [[ "$follow" == 1 ]]; then
    x tail -n 200 -F "$log_file"
  else
    x tail -n 200 "$log_file"
  fi
}

case "$cmd" in
  install) do_install ;;
  mount) do_mount ;;
  run) do_run ;;
  stop) do_stop ;;
  logs) do_logs ;;
  workdir) local_workdir "$workdir" ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$cmd' (install, mount, run, stop, logs, workdir)" ;;
esac
