"""Speculative and main-only decoding replayed from captured CUDA graphs (batch 1, fixed shapes).

At batch 1 on a GPU, one pass of a small head is a few dozen tiny kernels: their launches, not
their arithmetic, set its time. Speculative decoding adds a host sync (reading how many layers
were accepted) that drains the launch queue, so eagerly it saves little (``bench_decode_sweep``,
eager rows). A CUDA graph replays a fixed sequence of kernels with one launch. The speculative path
depends on the data at one point only, the accepted count a, so it is captured as K + 2 graphs:

  * ``propose_verify``: the draft call, the verify pass over positions 0..K and the accepted count
    a (the longest prefix of drafted layers equal to the main model's greedy rows), all on the GPU;
  * ``finish[a]`` for a = 0..K: the single-position passes for layers a+1..L-1, continuing from the
    verify pass's KV cache (the cache's first a+1 positions are what a sequential decode holds);

and main-only greedy decoding as one graph of L passes. One speculative decode = replay
``propose_verify``, read a (the one host sync), replay ``finish[a]``. Exactness is the eager path's:
the same ops on the same shapes, so the codes equal ``speculative_decode``'s and, in exact
acceptance, ``main_only_decode``'s (tests compare all three).

Off CUDA (the tests, a CPU run of the sweep) "capturing" keeps the Python function and "replaying"
calls it: the same static-buffer code runs, without graphs. Outputs are static buffers that the
next decode overwrites: copy what you keep.
"""

from __future__ import annotations

from typing import Callable

import torch

from common.policy.head import RFSQHead


class Replay:
    """A function captured as a CUDA graph (on a CUDA device) or kept to be called eagerly (elsewhere);
    with ``compile=True``, compiled by ``torch.compile`` instead, on any device.

    The function must read and write only static tensors (buffers that outlive the capture), since
    a graph replays the captured kernels on the captured memory. Runs in inference mode; a compiled
    function runs under ``no_grad`` (torch.compile cannot trace parameter views made in inference mode)."""

    def __init__(self, fn: Callable[[], object], device: torch.device, *, warmup: int = 3, compile: bool = False) -> None:
        self.fn, self.graph, self.compiled = fn, None, bool(compile)
        if self.compiled:
            self.fn = torch.compile(fn, dynamic=False)
            self()  # compile now (seconds to minutes), not at the first timed call
            return
        with torch.inference_mode():
            if device.type != "cuda":
                fn()  # the eager stand-in: run once, as a capture would (and fail here, not at the first replay)
                return
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, cuBLAS workspaces, autotuning)
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.compiled:  # out of any caller's inference mode too (the decode methods run in it)
            with torch.inference_mode(False), torch.no_grad():
                self.fn()
            return
        with torch.inference_mode():
            if self.graph is not None:
                self.graph.replay()
            else:
                self.fn()


class GraphedDecoder:
    """Batch-1 greedy decoding of the first ``num_layers`` layers of ``main``, main-only and (given a
    features draft with ``propose_rows``) speculative with exact acceptance, from captured graphs
    (``replay="graphs"``) or from the same bodies compiled by ``torch.compile`` (``replay="compile"``,
    any device; measured apart from the default eager path in docs/diagnostics/6h_torch_compile.md).

    ``draft`` proposes K = min(draft.coarse_layers, num_layers - 1, coarse_layers) layers (``coarse_layers``
    as in ``speculative_decode``: fewer drafted layers, a narrower verify pass); the draft object is called
    at capture time, so anything it returns must be a tensor the draft keeps writing in place (a
    model's outputs are; a benchmark's oracle draft keeps a fixed proposal buffer)."""

    def __init__(self, main: RFSQHead, draft=None, *, num_layers: int | None = None, coarse_layers: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, warmup: int = 3,
                 replay: str = "graphs") -> None:
        if replay not in ("graphs", "compile"):
            raise ValueError(f"GraphedDecoder replay: expected 'graphs' or 'compile', found {replay!r}")
        if main.training or (draft is not None and draft.training):
            raise RuntimeError("GraphedDecoder: expected main and draft in eval() mode (dropout would be captured)")
        param = next(main.parameters())
        self.device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        L = main.num_layers if num_layers is None else int(num_layers)
        if not 1 <= L <= main.num_layers:
            raise ValueError(f"GraphedDecoder num_layers: expected 1 <= n <= {main.num_layers}, found {num_layers}")
        self.main, self.draft, self.num_layers = main, draft, L
        T, V = main.tokens_per_layer, main.num_levels
        self.features = torch.zeros(1, main.feature_dim, device=self.device, dtype=dtype)

        # main-only: L passes in one graph
        self.main_codes = torch.zeros(1, T, L, dtype=torch.long, device=self.device)
        self.main_last_logits = torch.zeros(1, T, V, device=self.device, dtype=dtype)
        compile = replay == "compile"
        self.main_only = Replay(self._main_only, self.device, warmup=warmup, compile=compile)

        self.coarse_layers = 0
        if draft is None:
            return
        if getattr(draft, "input", "features") != "features" or not hasattr(draft, "propose_rows"):
            raise ValueError("GraphedDecoder: expected a features draft with propose_rows (a main_hidden draft is not graphed)")
        if draft.tokens_per_layer != T or draft.num_levels != V:
            raise ValueError(f"GraphedDecoder: draft emits {draft.tokens_per_layer} x {draft.num_levels} tokens x levels, "
                             f"main {T} x {V}")
        if coarse_layers is not None and (int(coarse_layers) != coarse_layers or coarse_layers < 1):
            raise ValueError(f"GraphedDecoder coarse_layers: expected an integer >= 1 (or None for all the draft's), found {coarse_layers!r}")
        K = min(draft.coarse_layers, L - 1, draft.coarse_layers if coarse_layers is None else int(coarse_layers))
        if K < 1:
            raise ValueError(f"GraphedDecoder: speculation needs num_layers >= 2 (a drafted layer and a verified one), found {L}")
        self.coarse_layers = K
        self.accepted = torch.zeros((), dtype=torch.long, device=self.device)
        self._state: tuple | None = None  # (greedy rows, verify logits, cache) of the latest propose_verify
        self.propose_verify = Replay(self._propose_verify, self.device, warmup=warmup, compile=compile)
        self.codes = [torch.zeros(1, T, L, dtype=torch.long, device=self.device) for _ in range(K + 1)]
        self.last_logits = [torch.zeros(1, T, V, device=self.device, dtype=dtype) for _ in range(K + 1)]
        self.finish = []
        for a in range(K + 1):
            self.propose_verify()  # each finish graph is captured on a real verify pass's cache
            self.finish.append(Replay(lambda a=a: self._finish(a), self.device, warmup=warmup, compile=compile))

    # ------------------------------------------------------------------ captured bodies
    def _main_only(self) -> None:
        codes, last = self.main.greedy_decode_(self.features, self.num_layers)
        self.main_codes.copy_(codes)
        self.main_last_logits.copy_(last)

    def _propose_verify(self) -> None:
        K = self.coarse_layers
        rows = self.draft.propose_rows(self.features)[:, :K]  # [1, K, T]
        logits, cache = self.main.verify_rows_(self.features, rows)  # [1, K+1, T, V]
        greedy = logits.argmax(dim=-1)  # [1, K+1, T]
        matches = (rows == greedy[:, :K]).all(dim=-1)  # [1, K]: layer l equals the main's greedy row
        self.accepted.copy_(matches.long().cumprod(dim=-1).sum())  # the longest all-equal prefix
        self._state = (greedy, logits, cache)

    def _finish(self, a: int) -> None:
        greedy, logits, cache = self._state
        cache.truncate_(a + 1)
        layers = [greedy[:, i] for i in range(a + 1)]
        last = logits[:, a]
        while len(layers) < self.num_layers:
            last = self.main.extend_(cache, layers[-1])
            layers.append(last.argmax(dim=-1))
        self.codes[a].copy_(torch.stack(layers, dim=2))
        self.last_logits[a].copy_(last)

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode_main_only(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (codes [1, T, L], last layer's logits [1, T, V]): static buffers, valid until the next call."""
        self.features.copy_(features)
        self.main_only()
        return self.main_codes, self.main_last_logits

    @torch.inference_mode()
    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Speculative decode -> (codes [1, T, L], accepted layers a, last layer's logits [1, T, V]);
        main passes = L - a, as in ``speculative_decode``. Static buffers, valid until the next call."""
        if self.draft is None:
            raise RuntimeError("GraphedDecoder.decode: built without a draft; use decode_main_only")
        self.features.copy_(features)
        self.propose_verify()
        a = int(self.accepted)  # the one host sync of a speculative decode
        self.finish[a]()
        return self.codes[a], a, self.last_logits[a]
