"""The shipped greater-than model: loads offline, is small, does the task, and its recorded circuit
(found by exact patching at training time) is re-derived from the weights."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl_patching

from fastpatch import patching as fp
from fastpatch.models import (
    GREATER_THAN_META,
    GREATER_THAN_WEIGHTS,
    GT_CORRUPT_YEAR,
    GT_N_YEARS,
    GT_QUERY,
    GT_YEAR0,
    GreaterThanProbDiff,
    greater_than_model_info,
    greater_than_prompts,
    greater_than_tokens,
    load_greater_than_model,
)

# circuit key -> (normalized_effects key, fastpatch sweep, TransformerLens's sweep or None). fastpatch's
# sweeps equal TransformerLens's on the zoo models (test_patching_oracle); here the head grid is
# checked against TransformerLens's loop once more (12 forwards; the by-position grids would take 48).
SWEEPS = {
    "heads": ("heads", fp.get_act_patch_attn_head_out_all_pos, tl_patching.get_act_patch_attn_head_out_all_pos),
    "mlps": ("mlp_out", fp.get_act_patch_mlp_out, None),
    "resid_positions": ("resid_pre", fp.get_act_patch_resid_pre, None),
}


@pytest.fixture(scope="module")
def model():
    return load_greater_than_model()


@pytest.fixture(scope="module")
def info():
    return greater_than_model_info()


def test_shipped_files_are_small(info):
    assert GREATER_THAN_WEIGHTS.stat().st_size < 5_000_000
    assert GREATER_THAN_META.stat().st_size < 100_000
    assert info["config"]["n_layer"] == 3 and info["config"]["n_head"] == 4
    assert info["accuracy"]["accuracy"] > 0.9


def test_prompts_and_metric():
    p = greater_than_prompts(16, seed=3)
    assert p.clean.shape == p.corrupted.shape == (16, 8)
    differ = (p.clean != p.corrupted).any(0)
    assert differ.nonzero().flatten().tolist() == [p.year_position]  # only YY differs
    assert (p.clean[:, p.year_position] == GT_YEAR0 + p.years).all()
    assert (p.corrupted[:, p.year_position] == GT_YEAR0 + GT_CORRUPT_YEAR).all()
    assert (p.clean[:, -1] == GT_QUERY).all() and (p.clean[:, p.year_position - 1] == GT_QUERY).all()
    assert all(torch.equal(a, b) for a, b in zip(p[:3], greater_than_prompts(16, seed=3)[:3]))
    # the metric against a plain loop over prompts and years
    logits = torch.randn(16, 8, 128, generator=torch.Generator().manual_seed(0))
    probs, years = torch.softmax(logits[:, -1].double(), -1).tolist(), p.years.tolist()
    loop = [sum(probs[b][GT_YEAR0 + y] * (1 if y > years[b] else -1) for y in range(GT_N_YEARS)) for b in range(16)]
    per_prompt = GreaterThanProbDiff(p.years, per_prompt=True)(logits)
    torch.testing.assert_close(per_prompt.double(), torch.tensor(loop, dtype=torch.float64), rtol=0, atol=1e-5)
    assert float(p.metric()(logits)) == pytest.approx(sum(loop) / 16, abs=1e-5)
    with pytest.raises(ValueError, match="years"):
        GreaterThanProbDiff(torch.tensor([100]))
    with pytest.raises(ValueError, match="logits"):
        GreaterThanProbDiff(p.years)(logits[:4])
    with pytest.raises(ValueError, match="filler"):
        greater_than_tokens(p.years, -1, 2)


@torch.no_grad()
def test_task_accuracy(model):
    """Fresh prompts in templates other than the recorded one: the argmax is a later year."""
    g = torch.Generator().manual_seed(99)
    hits = total = 0
    for before, after in ((0, 0), (1, 3), (4, 4)):
        years = torch.randint(2, GT_N_YEARS - 1, (64,), generator=g)
        logits = model(greater_than_tokens(years, before, after, generator=g))
        pred = logits[:, -1].argmax(-1) - GT_YEAR0
        hits += int(((pred > years) & (pred < GT_N_YEARS)).sum())
        total += 64
        assert float(GreaterThanProbDiff(years)(logits)) > 0.5
    assert hits / total > 0.9


def test_exact_patching_rederives_the_recorded_circuit(model, info):
    """On the recorded prompts, fastpatch's exact sweeps (checked against TransformerLens's own loop)
    give the recorded circuit: the same components above the threshold, in the same order."""
    circuit = info["circuit"]
    threshold = circuit["threshold"]
    p = greater_than_prompts(64, seed=7)
    metric = GreaterThanProbDiff(p.years)
    with torch.no_grad():
        clean_value, corrupted_value = float(metric(model(p.clean))), float(metric(model(p.corrupted)))
    assert clean_value == pytest.approx(circuit["clean_prob_diff"], abs=1e-3)
    assert corrupted_value == pytest.approx(circuit["corrupted_prob_diff"], abs=1e-3)
    assert clean_value - corrupted_value > 0.5  # the corruption removes the answer
    _, cache = model.run_with_cache(p.clean)
    for key, (grid_key, ours, theirs) in SWEEPS.items():
        effect = ours(model, p.corrupted, cache, metric, progress=False)
        assert float(effect.std()) > 1e-3  # the grid varies: an all-equal grid cannot pass
        if theirs is not None:
            reference = theirs(model, p.corrupted, cache, metric)
            torch.testing.assert_close(effect, reference, rtol=0, atol=1e-5 * max(1.0, float(reference.abs().max())))
        normalized = (effect - corrupted_value) / (clean_value - corrupted_value)
        cells = torch.nonzero(normalized >= threshold)
        derived = sorted(([*map(int, c), float(normalized[tuple(c)])] for c in cells), key=lambda r: -r[-1])
        recorded = circuit[key]
        assert [r[:-1] for r in derived] == [r[:-1] for r in recorded], key
        assert [r[-1] for r in derived] == pytest.approx([r[-1] for r in recorded], abs=1e-3), key
        recorded_grid = torch.tensor(circuit["normalized_effects"][grid_key], dtype=normalized.dtype)
        torch.testing.assert_close(normalized, recorded_grid, rtol=0, atol=1e-3, msg=key)
    # multi-step through MLPs: layer-0 heads move YY to the last position, whose MLPs then matter
    assert circuit["heads"] and circuit["mlps"]
    assert all(layer == 0 for layer, _, _ in circuit["heads"])
    assert all(pos == p.clean.shape[1] - 1 for _, pos, _ in circuit["mlps"])
