"""Decoding benchmarks: what speculative decoding costs and saves, from random-weight sweeps to trained heads and drafts."""
