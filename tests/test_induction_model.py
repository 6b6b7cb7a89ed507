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
    assert info["config"]["num_hidden_layers"] == 2 and info["config"]["num_attention_heads"] == 4
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


def _logit_diff(answer: torch.Tensor, wrong: torch.Tensor):
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

    return metric


@torch.no_grad()
def test_attention_scores_name_the_shipped_circuit(model, prompts):
    """The heads the metadata names pass the attention tests when re-measured from the weights."""
    clean = prompts[0]
    _, cache = model.run_with_cache(clean)
    q = torch.arange(1, clean.shape[1])
    prev = cache["blocks.0.attn.hook_pattern"][:, :, q, q - 1].mean((0, 2))
    q2 = torch.arange(HALF + 1, 2 * HALF + 1)
    ind = cache["blocks.1.attn.hook_pattern"][:, :, q2, q2 - HALF + 1].mean((0, 2))
    circuit = induction_model_info()["circuit"]
    prev_heads = [h for l, h in circuit["previous_token_heads"]]
    ind_heads = [h for l, h in circuit["induction_heads"]]
    assert prev_heads and ind_heads
    # A previous-token head puts most of its attention on the previous token; chance is ~1/16 here.
    assert all(prev[h] > 0.5 for h in prev_heads)
    assert all(ind[h] > 0.5 for h in ind_heads)
    assert int(prev.argmax()) == prev_heads[0] and int(ind.argmax()) in ind_heads


def test_exact_patching_ranks_the_circuit_first(model, prompts):
    """Patching each head's output (clean into corrupted) matters most for the circuit's heads."""
    from fastpatch.patching import get_act_patch_attn_head_out_all_pos

    clean, corrupted, answer, wrong = prompts
    metric = _logit_diff(answer, wrong)
    _, cache = model.run_with_cache(clean)
    with torch.no_grad():
        clean_ld, corrupted_ld = metric(model(clean)).item(), metric(model(corrupted)).item()
    assert clean_ld - corrupted_ld > 5  # the corruption removes the induction signal
    effect = get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False) - corrupted_ld
    circuit = induction_model_info()["circuit"]
    prev_heads = [tuple(x) for x in circuit["previous_token_heads"]]
    ind_heads = [tuple(x) for x in circuit["induction_heads"]]
    ranked = [divmod(int(i), effect.shape[1]) for i in effect.flatten().argsort(descending=True)]
    # The top head is the previous-token head; the next three are induction heads.
    assert ranked[0] in prev_heads
    assert all(cell in ind_heads for cell in ranked[1:4])


def test_previous_token_head_feeds_induction_heads_through_keys(model, prompts):
    """K-composition: the previous-token head's direct path into induction heads' keys restores the
    answer; its path into their queries barely matters (the last position's previous token is the
    same in both prompts: only the head's small attention to other, corrupted tokens differs)."""
    from fastpatch.patching import get_act_patch_direct_path_all_sources

    clean, corrupted, answer, wrong = prompts
    metric = _logit_diff(answer, wrong)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    with torch.no_grad():
        base = metric(model(corrupted)).item()
    effect = {
        c: get_act_patch_direct_path_all_sources(
            model, corrupted, clean_cache, corrupted_cache, metric, component=c, verbose=False
        )[0, :, 1, :] - base
        for c in "qkv"
    }  # [source head in layer 0, destination head in layer 1]
    (l0, prev_head), = [tuple(x) for x in induction_model_info()["circuit"]["previous_token_heads"]][:1]
    ind_heads = [h for l, h in induction_model_info()["circuit"]["induction_heads"]]
    k_row = effect["k"][prev_head]
    assert int(effect["k"].flatten().argmax()) // 4 == prev_head
    assert int(k_row.argmax()) in ind_heads
    assert effect["q"][prev_head].abs().max() < 1e-2 * k_row.max()
    # Its strongest key path beats every layer-0 -> layer-1 value path by a wide margin.
    assert k_row.max() > 2 * effect["v"].abs().max()
