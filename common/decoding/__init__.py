"""Decoding RFSQ tokens: main-only greedy and speculative (draft proposes, main verifies), with stage timing."""
