#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call (each bench separately, so one failure
# does not hide the rest). Usage: OUT=dir bash bench/gpu_session.sh [bench ...]
set -u
OUT=${OUT:-/tmp/r1jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -v '^{' "$OUT/$name.log" | tail -n 12; grep '^{' "$OUT/$name.log" | tail -n 1 >> "$OUT/results.jsonl"
}
benches=${*:-"env ceilings kernels train_dense decode train_moe_pallas train_moe_ragged train_moe_blocked grpo_dense grpo_moe remat"}
for b in $benches; do
  case $b in
    env) run env 60 python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())";;
    ceilings) run ceilings 120 python3 bench/ceilings.py;;
    kernels) run kernels 420 python3 bench/kernels.py --routing_tokens 0;;  # the 4096-token routing check hangs in XLA's compiler
    train_dense) run train_dense 300 python3 bench/train_step.py;;
    decode) run decode 300 python3 bench/decode.py;;
    train_moe_*) run "$b" 300 python3 bench/train_step.py --moe --moe_impl "${b#train_moe_}";;
    grpo_dense) run grpo_dense 300 python3 bench/grpo_step.py;;
    grpo_moe) run grpo_moe 300 python3 bench/grpo_step.py --moe;;
    remat) run remat 420 python3 bench/remat.py --size gpu --layers 0 --rows 8 --seq_len 2048;;  # not yet run on a GPU
    *) echo "unknown bench $b";;
  esac
done
