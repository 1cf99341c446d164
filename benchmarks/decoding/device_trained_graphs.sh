#!/usr/bin/env bash
# A trained head + draft (bundles from `python -m benchmarks.decoding.decode_trained_graphs export`) on one GPU:
# run from the repository root on the device machine,
#     bash benchmarks/decoding/device_trained_graphs.sh BUNDLE.pt [BUNDLE.pt ...]
# Needs python3 with torch (CUDA), tqdm and pytest; the package itself need not be installed. First the
# graphed decoder's exactness tests on the GPU (real CUDA graphs), then every bundle in float32 and
# bfloat16, eager and from CUDA graphs. Results: $OUT/<bundle stem>/<dtype>/decode_trained_graphs.{json,md}.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-artifacts/device_trained_graphs_out}
mkdir -p "$OUT"
[ "$#" -ge 1 ] || { echo "usage: bash benchmarks/decoding/device_trained_graphs.sh BUNDLE.pt [BUNDLE.pt ...]" >&2; exit 2; }

nvidia-smi -L
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode_graphs.py 2>&1 | tee "$OUT/graphs_tests.log"
status=${PIPESTATUS[0]}
echo "graphed decoder tests exit status: $status"

for bundle in "$@"; do
    stem=$(basename "$bundle" .pt)
    for dtype in float32 bfloat16; do
        timeout 150 python3 -m benchmarks.decoding.decode_trained_graphs run --bundle "$bundle" --device cuda --dtype "$dtype" \
            --chunks 300 --repeats 5 --out "$OUT/$stem/$dtype" > "$OUT/$stem.$dtype.log" 2>&1
        rc=$?
        echo "$stem $dtype exit status: $rc"; tail -n 8 "$OUT/$stem.$dtype.log"
        [ "$rc" -eq 0 ] || status=$rc
    done
done
exit $status
