"""The decode size sweep: its size filter, device defaults and result files (a tiny CPU run)."""

import json

import pytest
import torch

from benchmarks import bench_decode_sweep as sweep


def test_tiny_cpu_sweep_writes_table_with_device_and_formula(tmp_path):
    result = sweep.main(["--sizes", "64x1", "--repeats", "2", "--budget-s", "0.001", "--out", str(tmp_path)])
    rows = result["rows"]
    assert len(rows) == len(sweep.DRAFT_SIZES) * (sweep.K + 1)
    assert {r["main"] for r in rows} == {"main-64x1"}
    assert all(r["accepted_layers_observed"] == r["accepted_layers"] and r["codes_equal_main_only"] for r in rows)
    for r in rows:
        a, c, v = r["accepted_layers"], r["c"], r["v"]
        assert r["speedup_formula"] == pytest.approx(sweep.L / (sweep.L - a + c + v))
    saved = json.loads((tmp_path / "bench_decode_sweep.json").read_text())
    assert saved["complete"] and saved["device"] == "cpu" and saved["dtype"] == "float64"
    assert saved["torch_version"] == torch.__version__ and saved["sizes"] == ["64x1"]
    table = (tmp_path / "bench_decode_sweep.md").read_text()
    assert table.startswith("Device: CPU") and "S a=3 (formula)" in table
    first = next(line for line in table.splitlines() if line.startswith("| main-64x1"))
    assert first.count("x (") == sweep.K + 1  # every measured S has its formula beside it
    assert (tmp_path / "bench_decode_sweep.png").stat().st_size > 0


def test_sizes_filter_keeps_sweep_order_and_rejects_unknown():
    assert list(sweep.select_sizes("256x4,64x1")) == ["main-64x1", "main-256x4 (seed default)"]
    assert list(sweep.select_sizes(None)) == list(sweep.MAIN_SIZES)
    with pytest.raises(SystemExit, match=r"--sizes: expected a comma list of 64x1, 128x2, .* found '99x9'"):
        sweep.select_sizes("99x9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: expected a CUDA GPU, found none"):
        sweep.main(["--device", "cuda", "--sizes", "64x1", "--out", str(tmp_path)])
    assert not (tmp_path / "bench_decode_sweep.json").exists()


def test_gpu_defaults_never_overwrite_cpu_results():
    assert sweep.DEFAULT_OUT["cuda"] != sweep.DEFAULT_OUT["cpu"]
    assert sweep.DEFAULT_DTYPE == {"cpu": "float64", "cuda": "float32"}
