"""The decode size sweep: paired, interleaved timing, its size filter, device defaults and result files (a tiny CPU run)."""

import json
import statistics

import pytest
import torch

from benchmarks.decoding import bench_decode_sweep as sweep
from common.decoding.timing import MIN_REPEATS, Clock, median_ratio


def test_tiny_cpu_sweep_writes_table_with_device_and_formula(tmp_path):
    result = sweep.main(["--sizes", "64x1", "--repeats", "2", "--budget-s", "0.001", "--out", str(tmp_path)])
    rows = result["rows"]
    assert len(rows) == len(sweep.DRAFT_SIZES) * (sweep.K + 1)
    assert {r["main"] for r in rows} == {"main-64x1"}
    assert all(r["accepted_layers_observed"] == r["accepted_layers"] and r["codes_equal_main_only"] for r in rows)
    for r in rows:
        a, c, v = r["accepted_layers"], r["c"], r["v"]
        assert r["speedup_formula"] == pytest.approx(sweep.L / (sweep.L - a + c + v))
        assert r["timing"] == "paired, interleaved" and r["repeats"] == 2 and r["terms_repeats"] == 2
        assert r["speedup_measured_q1"] <= r["speedup_measured"] <= r["speedup_measured_q3"]
        assert r["main_pass_ms"] == pytest.approx(r["main_only_ms_terms_loop"] / sweep.L)
    saved = json.loads((tmp_path / "bench_decode_sweep.json").read_text())
    assert saved["complete"] and saved["device"] == "cpu" and saved["dtype"] == "float64"
    assert saved["torch_version"] == torch.__version__ and saved["sizes"] == ["64x1"] and saved["timing"] == "paired, interleaved"
    table = (tmp_path / "bench_decode_sweep.md").read_text()
    assert table.startswith("Device: CPU") and "S a=3 (formula)" in table and "paired, interleaved timing" in table
    first = next(line for line in table.splitlines() if line.startswith("| main-64x1"))
    assert first.count("x (") == sweep.K + 1  # every measured S has its formula beside it
    assert (tmp_path / "bench_decode_sweep.png").stat().st_size > 0


class FakeMachine:
    """A simulated clock: each call costs its work times the machine's current slowness (drift)."""

    def __init__(self, slowness):
        self.t, self.calls, self.slowness = 0.0, [], slowness

    def now(self):
        return self.t

    def call(self, name, work):
        def fn():
            self.t += work * self.slowness(len(self.calls))
            self.calls.append(name)
        return fn


def test_interleaved_loop_alternates_pairs_and_rotates_groups():
    machine = FakeMachine(lambda n: 1.0)
    clock = Clock(torch.device("cpu"), budget_s=1.0, now=machine.now)
    clock.interleaved_ms([machine.call("main", 1), machine.call("spec", 1)], repeats=4)
    assert machine.calls == ["main", "spec", "spec", "main", "main", "spec", "spec", "main"]
    machine.calls.clear()
    clock.interleaved_ms([machine.call(n, 1) for n in "abc"], repeats=3)
    assert machine.calls == list("abc" "bca" "cab")


def test_paired_speedup_is_immune_to_a_machine_that_speeds_up_between_loops():
    # the machine runs 3x slower for its first 50 calls; main-only does 8 units of work, speculative 10 (S = 0.8)
    def machine_and_clock():
        machine = FakeMachine(lambda n: 3.0 if n < 50 else 1.0)
        return machine, Clock(torch.device("cpu"), budget_s=1.0, now=machine.now)

    machine, clock = machine_and_clock()
    t_main, t_spec = clock.interleaved_ms([machine.call("main", 8e-3), machine.call("spec", 10e-3)], repeats=50)
    assert median_ratio(t_main, t_spec) == pytest.approx(0.8)
    assert statistics.median(t_main) == pytest.approx(16.0) and statistics.median(t_spec) == pytest.approx(20.0)
    # the old way, two loops one after the other, reports an impossible speedup > 1
    machine, clock = machine_and_clock()
    (t_main_alone,) = clock.interleaved_ms([machine.call("main", 8e-3)], 50)
    (t_spec_alone,) = clock.interleaved_ms([machine.call("spec", 10e-3)], 50)
    assert statistics.median(t_main_alone) / statistics.median(t_spec_alone) == pytest.approx(2.4)


def test_measure_fills_the_budget_within_the_repeat_bounds():
    machine = FakeMachine(lambda n: 1.0)
    pair = [machine.call("main", 0.01), machine.call("spec", 0.01)]  # 20 ms per repeat
    clock = Clock(torch.device("cpu"), budget_s=2.0, now=machine.now)
    assert [len(t) for t in clock.measure(pair, max_repeats=1000, warmup=3)] == [100, 100]
    assert [len(t) for t in clock.measure(pair, max_repeats=60, warmup=3)] == [60, 60]
    tight = Clock(torch.device("cpu"), budget_s=0.001, now=machine.now)
    assert len(tight.measure(pair, max_repeats=1000, warmup=1)[0]) == MIN_REPEATS
    with pytest.raises(ValueError, match="expected warmup >= 1"):
        clock.measure(pair, max_repeats=10, warmup=0)
    with pytest.raises(ValueError, match="median_ratio: expected two equally long non-empty lists, found 2 and 1"):
        median_ratio([1.0, 2.0], [1.0])


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


def test_graphs_flag_adds_graph_rows_that_stay_exact(tmp_path):
    # off CUDA the graphed decoder runs its static-buffer code eagerly: the rows check the path, labelled as such
    result = sweep.main(["--sizes", "64x1", "--repeats", "2", "--budget-s", "0.001", "--graphs", "--out", str(tmp_path)])
    graphed = [r for r in result["rows"] if r["replay"] == "eager (graph stand-in)"]
    assert len(graphed) == len(result["rows"]) // 2 == len(sweep.DRAFT_SIZES) * (sweep.K + 1)
    assert all(r["accepted_layers_observed"] == r["accepted_layers"] and r["codes_equal_main_only"] for r in graphed)
    assert result["graphs"] is True
    table = (tmp_path / "bench_decode_sweep.md").read_text()
    assert table.count("| eager (graph stand-in) |") == len(sweep.DRAFT_SIZES) and "| replay |" in table
