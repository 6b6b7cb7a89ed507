"""Benchmark fixtures' environment: no TransformerLens progress bars in timed loops."""

import os

# tqdm reads TQDM_* defaults when first imported; set this before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
