#!/usr/bin/env bash
# The decode size sweep on one GPU (issue 13): run from the repository root on the device machine,
#     bash benchmarks/decoding/device_sweep.sh [extra bench_decode_sweep flags, e.g. --budget-s 3 --repeats 3000]
# It needs python3 with torch (CUDA), matplotlib, tqdm and pytest; the package itself need not be installed.
# First the graphed decoder's exactness tests on the GPU (real CUDA graphs), then the sweep, eager and
# replayed from CUDA graphs (--graphs). Results land in $OUT/sweep/ and, copied, directly in $OUT
# (bench_decode_sweep.json / .md / .png, graphs_tests.log); the JSON is rewritten after every main size,
# so a run cut short by the timeout keeps what it measured.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-artifacts/device_sweep_out}
mkdir -p "$OUT/sweep"

nvidia-smi -L
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode_graphs.py 2>&1 | tee "$OUT/graphs_tests.log"
tests=${PIPESTATUS[0]}
echo "graphed decoder tests exit status: $tests"

timeout 420 python3 -m benchmarks.decoding.bench_decode_sweep --device cuda --graphs --out "$OUT/sweep" "$@"
status=$?
echo "bench_decode_sweep exit status: $status"

for f in "$OUT"/sweep/bench_decode_sweep.{json,md,png}; do
    [ -f "$f" ] && cp "$f" "$OUT/"
done
ls -l "$OUT"
[ "$tests" -eq 0 ] || exit "$tests"
exit $status
