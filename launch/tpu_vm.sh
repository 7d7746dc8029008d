#!/usr/bin/env bash
# Cloud TPU VMs for r1jax, single-host or multi-host (pod slices), with plain gcloud.
# Run it where gcloud is authenticated (your machine or Cloud Shell):
#
#   tpu_vm.sh create                 a TPU VM (or a queued resource with --queued), spot on request
#   tpu_vm.sh setup                  copy this checkout (or clone --git-url) to every worker,
#                                    pip install -e ".[tpu]" there, mount a gs:// workdir
#   tpu_vm.sh run -- TRAIN_ARGS      python -m r1jax.train TRAIN_ARGS on all workers at once,
#                                    output streamed here (--detach: in the background)
#   tpu_vm.sh retry -- TRAIN_ARGS    run, and after a preemption or failure recreate the TPU
#                                    if it is gone, set up again and rerun (the run resumes
#                                    from the last checkpoint in the workdir), up to
#                                    --max-retries times; exit status 2 (bad input) is final
#   tpu_vm.sh logs                   follow one worker's training log (--worker, default 0)
#   tpu_vm.sh ssh --command CMD      any command on the workers (--worker, default all)
#   tpu_vm.sh status                 the TPU's (or queued resource's) state
#   tpu_vm.sh stop                   stop the training processes on all workers
#   tpu_vm.sh delete                 delete the TPU VM (or the queued resource and its VM)
#
# Every value is a flag or an environment variable (flag wins):
#   --name             TPU_NAME             TPU VM name (required)
#   --zone             TPU_ZONE             zone, e.g. us-east5-a (required)
#   --project          TPU_PROJECT          project (default: gcloud's configured project)
#   --accelerator-type TPU_ACCELERATOR_TYPE e.g. v5p-8 (1 host), v5p-64 (8 hosts); default v5p-8
#   --runtime-version  TPU_RUNTIME_VERSION  default from the type: v2-alpha-tpuv5 (v5p),
#                                           v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e),
#                                           tpu-ubuntu2204-base (v4)
#   --queued           TPU_QUEUED           1: request through a queued resource
#   --qr-id            TPU_QR_ID            queued resource id (default: NAME-qr)
#   --spot             TPU_SPOT             1: spot capacity (preemptible at any time)
#   --preemptible      TPU_PREEMPTIBLE      1: legacy preemptible VM (not with --queued)
#   --reserved         TPU_RESERVED         1: use your reservation
#   --source           R1JAX_SOURCE         tarball (default: this checkout's tracked and
#                                           untracked-but-not-ignored files) or git
#   --git-url          R1JAX_GIT_URL        repository to clone with --source git
#   --git-ref          R1JAX_GIT_REF        branch, tag or commit (default: main)
#   --remote-dir       R1JAX_REMOTE_DIR     checkout on the workers, relative to home (default: r1jax)
#   --extra            R1JAX_PIP_EXTRA      pip extra installed on the workers (default: tpu)
#   --workdir          R1JAX_WORKDIR        run directory, normally gs://BUCKET/PATH; passed as
#                                           --config.workdir (through gcsfuse, see tpu_worker.sh)
#   --gcsfuse          R1JAX_GCSFUSE        1 (default): mount a gs:// workdir on every worker
#   --env              R1JAX_ENV            extra "KEY=VALUE ..." for the trainer on every worker
#   --detach           R1JAX_DETACH         1: run in the background on the workers
#   --worker           TPU_WORKER           worker(s) for logs / ssh: all, 0, 1-3, ...
#   --command          TPU_COMMAND          command for ssh
#   --max-retries      R1JAX_MAX_RETRIES    reruns after the first attempt (default 20)
#   --retry-delay      R1JAX_RETRY_DELAY    seconds before looking at the TPU after a failure (60)
#   --poll             TPU_POLL_SECONDS     seconds between state checks while waiting (30)
#   --wait-timeout     TPU_WAIT_TIMEOUT     give up waiting for the TPU after this many
#                                           seconds (default 0: wait as long as it takes)
#   --dry-run          R1JAX_DRY_RUN        1: print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
say() { echo "[tpu_vm $(date -u +%H:%M:%S)] $*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"  # quote, x
repo="$(dirname "$here")"
name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR_TYPE:-v5p-8}"
runtime="${TPU_RUNTIME_VERSION:-}"
queued="${TPU_QUEUED:-0}"
qr_id="${TPU_QR_ID:-}"
spot="${TPU_SPOT:-0}"
preemptible="${TPU_PREEMPTIBLE:-0}"
reserved="${TPU_RESERVED:-0}"
source_kind="${R1JAX_SOURCE:-tarball}"
git_url="${R1JAX_GIT_URL:-}"
git_ref="${R1JAX_GIT_REF:-main}"
remote_dir="${R1JAX_REMOTE_DIR:-r1jax}"
extra="${R1JAX_PIP_EXTRA:-tpu}"
workdir="${R1JAX_WORKDIR:-}"
gcsfuse="${R1JAX_GCSFUSE:-1}"
extra_env="${R1JAX_ENV:-}"
detach="${R1JAX_DETACH:-0}"
worker="${TPU_WORKER:-}"
command="${TPU_COMMAND:-}"
max_retries="${R1JAX_MAX_RETRIES:-20}"
retry_delay="${R1JAX_RETRY_DELAY:-60}"
poll="${TPU_POLL_SECONDS:-30}"
wait_timeout="${TPU_WAIT_TIMEOUT:-0}"
dry_run="${R1JAX_DRY_RUN:-0}"

[[ $# -ge 1 ]] || { usage; exit 2; }
cmd="$1"
shift
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --runtime-version) runtime="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --qr-id) qr_id="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --reserved) reserved=1; shift ;;
    --source) source_kind="$2"; shift 2 ;;
    --git-url) git_url="$2"; shift 2 ;;
    --git-ref) git_ref="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --extra) extra="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --gcsfuse) gcsfuse="$2"; shift 2 ;;
    --env) extra_env="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    --worker) worker="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --max-retries) max_retries="$2"; shift 2 ;;
    --retry-delay) retry_delay="$2"; shift 2 ;;
    --poll) poll="$2"; shift 2 ;;
    --wait-timeout) wait_timeout="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown flag $1 (train arguments go after --)" ;;
  esac
done
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac
[[ -n "$name" ]] || die "--name / TPU_NAME is required"
[[ -n "$zone" ]] || die "--zone / TPU_ZONE is required"
qr_id="${qr_id:-$name-qr}"
[[ "$queued" == 1 && "$preemptible" == 1 ]] && die "--preemptible is for plain TPU VMs; use --spot with --queued"
for n in "$max_retries" "$retry_delay" "$poll" "$wait_timeout"; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "'$n' is not a whole number of retries / seconds"
done
if [[ -z "$runtime" ]]; then
  case "$accelerator" in
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v4-*) runtime=tpu-ubuntu2204-base ;;
    *) die "no default runtime for $accelerator: pass --runtime-version" ;;
  esac
fi
where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")

# Runs a command line on workers ($1: all, 0, 1-3, ...) with the TPU's ssh.
on_workers() {
  x gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

worker_script() { echo "bash $(quote "$remote_dir/launch/tpu_worker.sh")"; }

# The TPU's state: READY / CREATING / PREEMPTED ... (queued resources: ACTIVE,
# WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDED, FAILED ...); MISSING if it does not exist.
state() {
  local out
  if [[ "$dry_run" == 1 ]]; then
    if [[ "$queued" == 1 ]]; then
      x gcloud compute tpus queued-resources describe "$qr_id" "${where[@]}" --format='value(state.state)' >&2
      echo ACTIVE
    else
      x gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' >&2
      echo READY
    fi
    return 0
  fi
  if [[ "$queued" == 1 ]]; then
    out="$(gcloud compute tpus queued-resources describe "$qr_id" "${where[@]}" \
      --format='value(state.state)' 2>/dev/null)" || out=MISSING
  else
    out="$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null)" \
      || out=MISSING
  fi
  echo "${out:-MISSING}"
}

is_ready() { [[ "$1" == READY || "$1" == ACTIVE ]]; }
is_gone() {
  case "$1" in
    MISSING | PREEMPTED | TERMINATED | SUSPENDING | SUSPENDED | FAILED | STOPPED) return 0 ;;
    *) return 1 ;;
  esac
}

wait_ready() {
  local start s
  start="$(date +%s)"
  while true; do
    s="$(state)"
    is_ready "$s" && return 0
    [[ "$s" == FAILED ]] && die "the queued resource $qr_id FAILED; see: gcloud compute tpus queued-resources describe $qr_id --zone=$zone"
    if [[ "$wait_timeout" -gt 0 && $(($(date +%s) - start)) -ge "$wait_timeout" ]]; then
      die "the TPU is still $s after ${wait_timeout}s (--wait-timeout)"
    fi
    say "TPU $name is $s; checking again in ${poll}s"
    sleep "$poll"
  done
}

do_create() {
  # Starts non-empty: an empty array under `set -u` fails in bash < 4.4 (macOS).
  local capacity=(--accelerator-type="$accelerator")
  [[ "$spot" == 1 ]] && capacity+=(--spot)
  [[ "$reserved" == 1 ]] && capacity+=(--reserved)
  if [[ "$queued" == 1 ]]; then
    x gcloud compute tpus queued-resources create "$qr_id" "${where[@]}" --node-id="$name" \
      --runtime-version="$runtime" "${capacity[@]}"
  else
    [[ "$preemptible" == 1 ]] && capacity+=(--preemptible)
    x gcloud compute tpus tpu-vm create "$name" "${where[@]}" --version="$runtime" "${capacity[@]}"
  fi
  wait_ready
  say "TPU $name ($accelerator) is ready"
}

do_delete() {
  if [[ "$queued" == 1 ]]; then
    # --force also deletes the TPU VM the queued resource holds.
    x gcloud compute tpus queued-resources delete "$qr_id" "${where[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

do_setup() {
  local fetch
  case "$source_kind" in
    tarball)
      local tarball="${TMPDIR:-/tmp}/r1jax-$name.tar.gz"
      # Tracked and untracked-but-not-ignored files that exist: what `git add -A` would commit.
      if [[ "$dry_run" == 1 ]]; then
        echo "+ git -C $(quote "$repo") ls-files -co --exclude-standard -z | tar -czf $(quote "$tarball") -C $(quote "$repo") --null -T -"
      else
        git -C "$repo" ls-files -co --exclude-standard -z \
          | while IFS= read -r -d '' f; do [[ ! -e "$repo/$f" ]] || printf '%s\0' "$f"; done \
          | tar -czf "$tarball" -C "$repo" --null -T -
      fi
      x gcloud compute tpus tpu-vm scp "$tarball" "$name:r1jax.tar.gz" "${where[@]}" --worker=all
      fetch="rm -rf $(quote "$remote_dir") && mkdir -p $(quote "$remote_dir") && tar -xzf r1jax.tar.gz -C $(quote "$remote_dir")"
      ;;
    git)
      [[ -n "$git_url" ]] || die "--source git needs --git-url / R1JAX_GIT_URL"
      local d
      d="$(quote "$remote_dir")"
      fetch="{ [ -d $d/.git ] || git clone --quiet $(quote "$git_url") $d; } && git -C $d fetch --quiet origin && git -C $d checkout --quiet $(quote "$git_ref") && { git -C $d merge --quiet --ff-only $(quote "origin/$git_ref") 2>/dev/null || true; }"
      ;;
    *) die "--source must be tarball or git (got '$source_kind')" ;;
  esac
  local steps
  steps="$fetch && $(worker_script) install --extra $(quote "$extra")"
  if [[ "$workdir" == gs://* && "$gcsfuse" == 1 ]]; then
    steps+=" && $(worker_script) mount --workdir $(quote "$workdir")"
  fi
  on_workers all "$steps"
}

run_line() {
  local line
  line="$(worker_script) run --workdir $(quote "$workdir") --gcsfuse $(quote "$gcsfuse") --env $(quote "$extra_env")"
  [[ "$detach" == 1 ]] && line+=" --detach"
  echo "$line -- $(quote "${train_args[@]}")"
}

do_run() {
  [[ ${#train_args[@]} -gt 0 ]] || die "run needs the training arguments after --, e.g. -- --config configs/r1_zero_deepseek_v3.py"
  on_workers all "$(run_line)"
}

do_stop() { on_workers all "$(worker_script) stop"; }

do_retry() {
  [[ ${#train_args[@]} -gt 0 ]] || die "retry needs the training arguments after --"
  [[ "$detach" == 1 ]] && die "retry watches the run: it cannot be --detach"
  local attempt=0 rc s
  while true; do
    s="$(state)"
    if is_gone "$s"; then
      say "TPU $name is $s: recreating it"
      [[ "$s" == MISSING ]] || do_delete
      do_create
      do_setup
    elif ! is_ready "$s"; then
      wait_ready
    fi
    say "attempt $((attempt + 1)) of $((max_retries + 1))"
    rc=0
    on_workers all "$(run_line)" || rc=$?
    [[ "$dry_run" == 1 ]] && return 0
    if [[ $rc -eq 0 ]]; then
      say "run finished"
      return 0
    fi
    if [[ $rc -eq 2 ]]; then
      say "the run rejected its input (exit status 2): not retrying"
      return 2
    fi
    attempt=$((attempt + 1))
    if [[ $attempt -gt $max_retries ]]; then
      say "run failed (exit status $rc) after $attempt attempts: giving up (--max-retries $max_retries)"
      return "$rc"
    fi
    say "run failed (exit status $rc); looking at the TPU in ${retry_delay}s"
    sleep "$retry_delay"
    # Any trainer still alive on a healthy TPU would hold the chips: stop it first.
    s="$(state)"
    if is_ready "$s"; then
      do_stop || true
    fi
  done
}

case "$cmd" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  retry) do_retry ;;
  logs) on_workers "${worker:-0}" "$(worker_script) logs --follow" ;;
  ssh)
    [[ -n "$command" ]] || die "ssh needs --command / TPU_COMMAND"
    on_workers "${worker:-all}" "$command"
    ;;
  status) state ;;
  stop) do_stop ;;
  delete) do_delete ;;
  *) die "unknown command '$cmd' (create, setup, run, retry, logs, ssh, status, stop, delete)" ;;
esac
