"""Wall-clock timing of named stages (backbone, draft, main, tokenizer decode) per chunk."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

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
