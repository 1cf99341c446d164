"""Wall-clock timing of decoding: named stages per chunk (``StageTimer``, what the closed loop reports) and
paired, interleaved loops (``Clock``, ``median_ratio``: what every decode benchmark compares with).

A GPU machine or a shared CPU drifts over seconds, so a ratio of two medians taken in separate loops
mixes the drift into the ratio. ``Clock.interleaved_ms`` times several calls back to back in every
repeat, rotating their order; ``median_ratio`` is the median of the per-repeat ratios.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


class StageTimer:
    """Accumulating wall-clock timer per named stage (time.perf_counter).

    GPU work is asynchronous, so when CUDA is in use the stage boundaries call
    ``torch.cuda.synchronize()``; ``cuda_sync=None`` decides automatically (CUDA initialised).
    """

    def __init__(self, *, cuda_sync: bool | None = None) -> None:
        self.cuda_sync = cuda_sync
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def _sync(self) -> None:
        sync = self.cuda_sync
        if sync is None:
            sync = torch.cuda.is_available() and torch.cuda.is_initialized()
        if sync:
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self.totals[name] = self.totals.get(name, 0.0) + dt
            self.counts[name] = self.counts.get(name, 0) + 1
            self.last[name] = dt

    def mean(self, name: str) -> float:
        if not self.counts.get(name):
            raise KeyError(f"StageTimer: no timings recorded for stage {name!r}; found {sorted(self.counts)}")
        return self.totals[name] / self.counts[name]

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {"total_s": self.totals[k], "count": self.counts[k], "mean_s": self.totals[k] / self.counts[k]}
            for k in self.totals
        }


# --- paired, interleaved loops ----------------------------------------------------------------------
MIN_REPEATS = 15  # per-repeat ratios vary far less than separate medians, so the slow heads need fewer repeats


class Clock:
    """Interleaved wall-time loops; on CUDA the queue is drained before and after each timed call.

    ``now`` is injectable so the tests can drive the loop with a simulated, drifting clock."""

    def __init__(self, device: torch.device, budget_s: float, now: Callable[[], float] = time.perf_counter):
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.budget_ms = 1e3 * budget_s
        self.now = now

    def interleaved_ms(self, fns: Sequence[Callable[[], object]], repeats: int,
                       before: Callable[[], object] | None = None) -> list[list[float]]:
        """Times (ms) of each fn per repeat, all fns called back to back in every repeat, the order rotated
        by one each repeat (two fns: alternating which goes first), so drift and call-order effects hit
        every fn alike -> one list of ``repeats`` times per fn. ``before`` runs, untimed, before every
        call (e.g. ``evict_caches``: each call then starts as after a simulator step)."""
        times: list[list[float]] = [[] for _ in fns]
        for i in range(repeats):
            first = i % len(fns)
            for j in [*range(first, len(fns)), *range(first)]:
                if before is not None:
                    before()
                self.sync()
                t0 = self.now()
                fns[j]()
                self.sync()
                times[j].append(1e3 * (self.now() - t0))
        return times

    def measure(self, fns: Sequence[Callable[[], object]], max_repeats: int, warmup: int) -> list[list[float]]:
        """``warmup`` repeats (discarded, except as a probe of one repeat's cost), then as many repeats as fill
        the time budget: at least MIN_REPEATS (or max_repeats if smaller), at most max_repeats."""
        if warmup < 1:
            raise ValueError(f"Clock.measure: expected warmup >= 1 (it probes the cost of a repeat), found {warmup}")
        probe = self.interleaved_ms(fns, warmup)
        per_repeat_ms = statistics.median(sum(t) for t in zip(*probe))
        repeats = max(min(MIN_REPEATS, max_repeats), min(max_repeats, int(self.budget_ms / max(per_repeat_ms, 1e-6))))
        return self.interleaved_ms(fns, repeats)


def median_ratio(numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0) -> float:
    """Median over repeats of scale * numerator_i / denominator_i (the pairs come from the same repeat)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"median_ratio: expected two equally long non-empty lists, found {len(numerator)} and {len(denominator)}")
    return statistics.median(scale * n / d for n, d in zip(numerator, denominator))


EVICT_BYTES = 32 << 20  # larger than the last-level cache of the machines these benchmarks ran on


def eviction_buffer() -> torch.Tensor:
    return torch.zeros(EVICT_BYTES // 4, dtype=torch.float32)


def evict_caches(buffer: torch.Tensor) -> None:
    """Touch every cache line of ``buffer`` (``eviction_buffer()``): the next call finds its weights
    and activations out of the data caches, as after a simulator step between two chunks (the
    simulator also evicts code and branch state, which this does not)."""
    buffer.add_(1.0)


def device_label(device: torch.device, threads: int) -> str:
    """The device a timing ran on, as the result tables name it."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread(s)"
