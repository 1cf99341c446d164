"""lucidrains' ``ResidualFSQ`` (vector-quantize-pytorch) behind our ``ResidualFSQ`` interface: the outside
reference the tokenizer benchmarks put in the same autoencoder as ours. vector-quantize-pytorch is a
benchmark-only dependency (``requirements-bench.txt``), imported when an adapter is built."""

from __future__ import annotations

from torch import nn


class LucidrainsRFSQ(nn.Module):
    """Adapter: lucidrains' ResidualFSQ behind our ``ResidualFSQ`` interface. It quantizes each latent
    number as its own 1-d vector (``dim=1, levels=[num_levels]``), so its tokens per layer equal ours."""

    def __init__(self, *, dim: int, num_layers: int, num_levels: int):
        super().__init__()
        from vector_quantize_pytorch import ResidualFSQ as _LucidrainsResidualFSQ

        self.dim, self.num_layers, self.num_levels = dim, num_layers, num_levels
        self.conditioning = "lucidrains"
        self.inner = _LucidrainsResidualFSQ(dim=1, levels=[num_levels], num_quantizers=num_layers)

    def forward(self, z, *, num_layers=None, return_residuals=False):
        if num_layers not in (None, self.num_layers) or return_residuals:
            raise NotImplementedError("the lucidrains adapter only supports full-depth quantization")
        quantized, idx = self.inner(z.unsqueeze(-1))
        return quantized.squeeze(-1), idx.long()

    def decode_indices(self, indices):
        return self.inner.get_output_from_indices(indices).squeeze(-1)

    def calibrate(self, z):  # no statistics to calibrate
        return None
