"""Benchmark fixtures' environment: no TransformerLens progress bars in timed loops, one intra-op
thread (the smoke tests' tensors are tiny; the ratio scripts set their own threads)."""

import os
from typing import Any, Tuple

import pytest
import torch

torch.set_num_threads(1)

# tqdm reads TQDM_* defaults when first imported; set this before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def small_model_and_pair() -> Tuple[torch.nn.Module, Any]:
    """The smoke tests' random-init GPT-2 at the scripts' ``--small`` shape (seed 0) and its IOI-shaped
    prompt pairs, corrupted from position 4 (``bench.models.PromptPair``); built once per test module."""
    from bench.compare_transformer_lens import SHAPES
    from bench.models import gpt2_small_shaped, ioi_like_tokens

    small = SHAPES["small"]
    model = gpt2_small_shaped(0, small["layers"], small["d_model"], small["heads"], small["vocab"])
    return model, ioi_like_tokens(small["vocab"], small["batch"], small["positions"], corrupt_from=4)
