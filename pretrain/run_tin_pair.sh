#!/usr/bin/env bash
# Train the DINO and the supervised Tiny-ImageNet recipes side by side on one GPU, for the same budget.
# Usage: pretrain/run_tin_pair.sh DATA.npz OUT_DIR [extra pretrain_tin.py options...]
# Each run writes OUT_DIR/vit-tiny-in200-{ssl,sup}.{safetensors,json} and OUT_DIR/{dino,supervised}.log.
set -u
data=$1 out=$2
shift 2
here=$(dirname "$0")
barrier=$(mktemp -d)
mkdir -p "$out"
pids=()
for method in dino supervised; do
    PYTHONUNBUFFERED=1 python3 "$here/pretrain_tin.py" --method "$method" --data "$data" --out "$out" \
        --barrier-dir "$barrier" --barrier-count 2 "$@" >"$out/$method.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 4 "$out"/*.log
exit $status
