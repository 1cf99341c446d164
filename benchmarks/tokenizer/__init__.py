"""Tokenizer benchmarks: reconstruction error, bits and speed of action tokenizers, and the action data they code."""
