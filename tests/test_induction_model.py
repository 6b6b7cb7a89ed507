"""The shipped 2-layer induction model: loads offline, is small, and continues repeated sequences."""

from __future__ import annotations

import pytest
import torch

from fastpatch.models import (
    INDUCTION_META,
    INDUCTION_WEIGHTS,
    induction_model_info,
    induction_prompts,
    load_induction_model,
    repeated_sequences,
)

HALF = 16


@pytest.fixture(scope="module")
def model():
    return load_induction_model()


@pytest.fixture(scope="module")
def prompts():
    return induction_prompts(32, HALF, seed=2024)


def test_shipped_files_are_small():
    assert INDUCTION_WEIGHTS.stat().st_size < 5_000_000
    assert INDUCTION_META.stat().st_size < 100_000
    info = induction_model_info()
    assert info["config"]["n_layer"] == 2 and info["config"]["n_head"] == 4
    assert info["accuracy"]["second_half"] > 0.9


def test_prompts_shape_and_tokens(prompts):
    clean, corrupted, answer, wrong = prompts
    assert clean.shape == corrupted.shape == (32, 1 + 2 * HALF)
    assert (clean[:, 0] == 0).all() and (corrupted[:, 0] == 0).all()
    assert torch.equal(clean[:, 1 : HALF + 1], clean[:, HALF + 1 :])
    assert torch.equal(corrupted[:, HALF + 1 :], clean[:, HALF + 1 :])
    first_clean, first_corr = clean[:, 1 : HALF + 1], corrupted[:, 1 : HALF + 1]
    # Corrupted first half shares no token with the clean sequence.
    assert not (first_corr[:, :, None] == first_clean[:, None, :]).any()
    assert torch.equal(answer, clean[:, 1]) and torch.equal(wrong, corrupted[:, 1])
    again = induction_prompts(32, HALF, seed=2024)
    assert all(torch.equal(a, b) for a, b in zip(prompts, again))


@torch.no_grad()
def test_second_half_accuracy(model):
    g = torch.Generator().manual_seed(99)
    hits = total = 0
    for n in (12, 16, 20):
        tokens = repeated_sequences(32, n, 64, 2, g)
        pred = model(tokens).argmax(-1)
        hits += (pred[:, n + 1 : 2 * n] == tokens[:, n + 2 :]).sum().item()
        total += tokens[:, n + 2 :].numel()
    assert hits / total > 0.9
