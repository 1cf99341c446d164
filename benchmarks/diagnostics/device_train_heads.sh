#!/usr/bin/env bash
# Train several Phase 2 main models at once on one GPU (a lent device machine), one process per run:
# run from the repository root there,
#     bash benchmarks/diagnostics/device_train_heads.sh RUNS.txt
# RUNS.txt holds one run per line, "NAME FLAGS...": the flags of
# `python -m phase2_draft_retrain.modal_train_draft_with_projection` (paths relative to the repository root;
# `--models-dir`/`--results-dir` are set here). The Phase 2 module imports modal, which that machine lacks, so
# this calls the same parser and library function (rsd_entry.parse_config -> common.policy.train.train_policy).
# Needs python3 with torch (CUDA), h5py, numpy and tqdm; the package itself need not be installed.
# Each run's best head comes back as $OUT/NAME.pt (the device tool returns at most 8 files, 16 MiB each);
# every run's log, metrics and training summary come back in $OUT/logs.tar.gz. A run stops at
# RUN_TIMEOUT seconds (default 420); then its head is the best epoch so far, without a decode choice.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-artifacts/device_train_heads_out}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
[ "$#" -eq 1 ] && [ -f "$1" ] || { echo "usage: bash benchmarks/diagnostics/device_train_heads.sh RUNS.txt" >&2; exit 2; }
mkdir -p "$OUT/work"

nvidia-smi -L
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' || exit 1

TRAIN='import sys, rsd_entry
from common.policy.config import PolicyTrainConfig
from common.policy.train import train_policy
train_policy(rsd_entry.parse_config(PolicyTrainConfig, sys.argv[1:]))'

names=()
pids=()
while read -r name flags; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    dir="$OUT/work/$name"
    mkdir -p "$dir"
    # shellcheck disable=SC2086  # the flags are meant to split
    timeout "$RUN_TIMEOUT" python3 -c "$TRAIN" $flags --models-dir "$dir/models" --results-dir "$dir/results" \
        --device cuda --no-progress > "$dir/train.log" 2>&1 &
    names+=("$name")
    pids+=($!)
    echo "started $name (pid $!)"
done < "$1"

status=0
for i in "${!names[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    name=${names[$i]}
    echo "== $name exit status: $rc"
    tail -n 5 "$OUT/work/$name/train.log"
    head=$(ls "$OUT/work/$name/models"/best_rfsq_head*.pt 2>/dev/null | head -n 1)
    if [ -n "$head" ]; then cp "$head" "$OUT/$name.pt"; else echo "$name: no head written"; fi
    [ "$rc" -eq 0 ] || status=$rc
done

# Logs, metrics and summaries (no weights: the resume states are 3x a head) in one archive.
tar -C "$OUT/work" -czf "$OUT/logs.tar.gz" \
    $(cd "$OUT/work" && find . \( -name '*.log' -o -name '*.jsonl' -o -name '*.json' -o -name '*.md' \) -print)
rm -rf "$OUT/work"
ls -l "$OUT"
exit $status
