"""Diagnostics: why an episode failed, whether two runs agree, what the tokens and policy lose, and run-comparison tools."""
