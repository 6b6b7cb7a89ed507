"""The memory planner keeps a sweep under an explicit budget (CPU, measured), and bf16 sweeps
agree with fp32 ones within a documented tolerance."""

import gc

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from memory_meter import LiveBytes

import fastpatch
from fastpatch import patching as fp

# bytes: a few cells' worth of working memory for this model and prompt on each backend (the
# native backend's cells recompute only a suffix of the forward and need far less)
BUDGET = {"hooks": 2_000_000, "native": 150_000}


@pytest.fixture(scope="module")
def long_case():
    return zoo.Case.build("gpt2", batch=4, n_pos=12, first_diff=3)


def _peak(case, **kwargs):
    """Peak live bytes of a by-position head sweep (108 cells: the planner's chunking is the same
    for every sweep, and one sweep keeps the one-cell-per-pass floor run short)."""
    gc.collect()
    with LiveBytes() as meter:
        out = fp.get_act_patch_attn_head_out_by_pos(
            case.model, case.corrupted, case.clean_cache, case.scalar, progress=False, **kwargs
        )
    gc.collect()
    return meter.peak, out, fastpatch.last_run_stats()


@pytest.mark.parametrize("backend", ["hooks", "native"])
def test_memory_budget_bounds_the_working_memory(long_case, backend):
    """Peak allocated bytes with a budget stay within the budget above the irreducible minimum
    (one cell per pass: the corrupted run's cache and one pass), and the budget really binds."""
    floor, one_by_one, _ = _peak(long_case, backend=backend, chunk_size=1)
    budget = BUDGET[backend]
    budgeted, out, stats = _peak(long_case, backend=backend, memory_budget=budget)
    unbounded, everything, _ = _peak(long_case, backend=backend, chunk_size=10**6)
    assert budgeted <= floor + budget, (budgeted, floor)
    assert unbounded > floor + budget, "the sweep must need more than the budget for the test to mean anything"
    assert stats["backend"] == backend and stats["chunks"] > 1 and stats["oom_retries"] == 0
    assert_varies(everything)
    assert_close(out, one_by_one)
    assert_close(out, everything)


def test_run_stats_are_reported(long_case):
    fp.get_act_patch_resid_pre(long_case.model, long_case.corrupted, long_case.clean_cache, long_case.scalar, progress=False, chunk_size=5)
    stats = fastpatch.last_run_stats()
    assert stats["backend"] == "native" and stats["max_cells_per_chunk"] <= 5
    n_layers, n_pos = long_case.model.cfg.n_layers, long_case.corrupted.shape[1]
    assert stats["cells"] == n_layers * n_pos and stats["chunks"] > 1
    assert stats["peak_bytes"] is None  # measured on CUDA only


# bf16 keeps 8 bits of mantissa (relative rounding 2^-9); over a few layers and a softmax the
# metric's error stays within about 1% of its magnitude (measured worst case 0.7% on the zoo),
# so we hold bf16 sweeps to 2% of max |fp32 value|.
BF16_TOL = 0.02


@pytest.mark.parametrize("backend", ["hooks", "native"])
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_bf16_sweeps_agree_with_fp32(name, backend):
    case = zoo.Case.build(name)
    low = zoo.ZOO[name]().to(torch.bfloat16)
    with torch.no_grad():
        _, low_cache = low.run_with_cache(case.clean)
    for sweep in ("get_act_patch_attn_head_all_pos_every", "get_act_patch_resid_pre"):
        ref = getattr(fp, sweep)(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
        out = getattr(fp, sweep)(low, case.corrupted, low_cache, case.scalar, progress=False, backend=backend)
        assert out.dtype == torch.float32  # metric values are gathered in fp32
        assert float((out - ref).abs().max()) <= BF16_TOL * float(ref.abs().max()), sweep
        assert_varies(ref)
