"""Action tokenizer: FSQ, residual FSQ (naive and robust), the ActionRFSQAE model, its training and diagnostics."""
