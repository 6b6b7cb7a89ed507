"""Benchmark fixtures' environment: no TransformerLens progress bars in timed loops, one intra-op
thread (the smoke tests' tensors are tiny; the ratio scripts set their own threads)."""

import os

import torch

torch.set_num_threads(1)

# tqdm reads TQDM_* defaults when first imported; set this before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
