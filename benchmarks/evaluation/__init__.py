"""Evaluation benchmarks: closed-loop success and throughput, baselines (scripted expert, continuous policy) and result tables."""
