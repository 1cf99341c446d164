"""The policy: backbones, token labels, the main model (RFSQ head), the draft, their training and metrics."""
