"""RSD library: demos -> tokenizer -> token labels -> main and draft models -> decoding -> closed-loop evaluation -> report."""
