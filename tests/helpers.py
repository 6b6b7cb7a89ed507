"""Comparison helpers: fp32 tolerances and checks that a reference is not trivially constant."""

from __future__ import annotations

import torch
from transformer_lens.patching import PatchingResult

# fp32: batching changes the order of a few float reductions (matmul blocking), ~1e-7 relative
# per op, compounded over a few layers; 1e-5 of the values' scale is the dtype's budget.
RTOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * max(scale, 1e-3))


def assert_varies(reference: torch.Tensor, what: str = "reference") -> None:
    """A comparison only proves something if the reference differs across its cells."""
    flat = reference.reshape(-1).float()
    assert flat.numel() > 1 and float(flat.max() - flat.min()) > 1e-3, f"{what} is (nearly) constant: {flat[:8]}"


def assert_results_equal(ours, ref) -> None:
    """Same return type and, for PatchingResult, the same fields value by value."""
    assert type(ours) is type(ref), (type(ours), type(ref))
    if isinstance(ref, torch.Tensor):
        assert_close(ours, ref)
        return
    if isinstance(ref, tuple):
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert_results_equal(a, b)
        return
    if hasattr(ref, "equals"):  # pandas DataFrame
        assert ours.equals(ref), (ours.head(), ref.head())
        return
    assert isinstance(ref, PatchingResult)
    assert_close(ours.values, ref.values)
    assert ours.axis_names == ref.axis_names
    assert ours.metric_names == ref.metric_names
    assert ours.reduced == ref.reduced
    assert ours.has_metric_axis == ref.has_metric_axis
    assert ours.patch_type_names == ref.patch_type_names
    assert ours.index_df.reset_index(drop=True).equals(ref.index_df.reset_index(drop=True))
    assert (ours.baseline is None) == (ref.baseline is None)
    if ref.baseline is not None:
        assert_close(ours.baseline, ref.baseline)
