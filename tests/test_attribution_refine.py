"""fastpatch.attribution refinements: integrated gradients, AtP*'s QK fix and exact verification."""

from __future__ import annotations

import pytest
import torch
import zoo
from helpers import assert_close

from fastpatch import attribution as refine  # integrated_gradients, atpstar, verification
from fastpatch import patching
from fastpatch.attribution import nodes


@pytest.fixture(scope="module")
def case():
    return zoo.Case.build("gpt2")


def _baseline(model, tokens, metric):
    with torch.no_grad():
        return metric(model(tokens))


# ---- integrated gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("sweep", ["resid_pre", "attn_head_out_all_pos", "attn_head_pattern_by_pos"])
def test_ig_left_rule_one_step_is_plain_attribution(case, sweep):
    plain = getattr(nodes, f"get_attr_patch_{sweep}")(case.model, case.clean, case.corrupted, case.scalar)
    ig = refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, sweep, 1, rule="left")
    assert_close(ig, plain)


def test_ig_full_sweep_shape_and_reduce(case):
    sweep = "attn_head_out_all_pos"
    plain = nodes.get_attr_patch_attn_head_out_all_pos(case.model, case.clean, case.corrupted, case.scalar)
    ig = refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, sweep, 4)
    assert ig.shape == plain.shape and torch.isfinite(ig).all()
    assert not torch.allclose(ig, plain)  # gradients at alpha > 0 differ from alpha = 0
    per = refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.per_example, sweep, 4, reduce="none")
    assert per.shape == plain.shape + (case.clean.shape[0],)
    assert_close(per.mean(-1), ig)  # scalar metric is the batch mean of the per-example one


@pytest.mark.parametrize(
    "sweep, cell",
    [("resid_pre", (1, 3)), ("attn_head_out_all_pos", (0, 1))],
)
def test_ig_single_cell_converges_to_exact_patch(case, sweep, cell):
    """Only the patched cell is interpolated: the midpoint-rule estimate -> the exact effect, O(1/n^2)."""
    exact = getattr(patching, f"get_act_patch_{sweep}")(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    effect = float(exact[cell] - _baseline(case.model, case.corrupted, case.scalar))
    assert abs(effect) > 1e-2
    steps = [1, 2, 4, 8, 16]
    errors = []
    for n in steps:
        est = refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, sweep, n, cell=cell)
        assert est.ndim == 0
        errors.append(abs(float(est) - effect))
    assert errors[0] > 1e-4, errors  # one step is not already exact: the test has teeth
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * max(abs(effect), 0.1) + 2e-5, (errors, effect)
    assert errors[-1] < 0.05 * errors[0], errors


def test_ig_rejects_bad_arguments(case):
    with pytest.raises(ValueError, match="unknown sweep"):
        refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, "nope")
    with pytest.raises(ValueError, match="ig_steps"):
        refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, "resid_pre", 0)
    with pytest.raises(ValueError, match="rule"):
        refine.get_attr_patch_ig(case.model, case.clean, case.corrupted, case.scalar, "resid_pre", rule="trapezoid")


# ---- AtP* QK fix -------------------------------------------------------------------------------
def _saturated_case(scale: float) -> zoo.Case:
    """2-layer gpt2 whose last-layer queries are scaled up: its softmax is (nearly) one-hot."""
    model = zoo.gpt2(n_layers=2)
    attn = model.blocks[1].attn
    d = model.cfg.d_model
    with torch.no_grad():
        attn.q._original_component.weight.mul_(scale)
        attn.q._original_component.bias.mul_(scale)
        attn.qkv._original_component.weight[:, :d].mul_(scale)
        attn.qkv._original_component.bias[:d].mul_(scale)
    return zoo.Case("gpt2-saturated", model, *zoo.prompt_pair())


def test_atpstar_finds_key_patches_that_saturated_softmax_hides():
    case = _saturated_case(3000.0)
    model = case.model
    metric = lambda logits: case.metrics["logit_gap"](logits).mean()  # noqa: E731
    _, cache = model.run_with_cache(case.corrupted)
    row_max = cache["blocks.1.attn.hook_pattern"].max(-1).values
    assert float(row_max.min()) > 0.95  # saturated on the corrupted run
    base = _baseline(model, case.corrupted, metric)
    for which in ("k", "q"):
        sweep = getattr(patching, f"get_act_patch_attn_head_{which}_all_pos")
        exact = sweep(model, case.corrupted, case.clean_cache, metric, progress=False)[1] - base
        plain = getattr(nodes, f"get_attr_patch_attn_head_{which}_all_pos")(model, case.clean, case.corrupted, metric)[1]
        star = getattr(refine, f"get_attr_patch_attn_head_{which}_all_pos_atpstar")(model, case.clean, case.corrupted, metric)[1]
        # heads with a large exact effect whose plain gradient vanished through the one-hot softmax
        hidden = [h for h in range(model.cfg.n_heads) if abs(float(exact[h])) > 0.15 and abs(float(plain[h])) < 1e-6]
        assert which == "q" or len(hidden) >= 2, (which, exact, plain)
        for h in hidden:
            assert abs(float(star[h] - exact[h])) < 0.5 * abs(float(exact[h])), (which, h, exact, star)
            assert float(star[h]) * float(exact[h]) > 0
        # over the whole last layer, AtP* is far closer to the exact sweep than plain attribution
        assert float((star - exact).abs().max()) < 0.2 * float((plain - exact).abs().max())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_atpstar_last_layer_matches_exact_on_unsaturated_models(name):
    """Last layer: only pattern -> metric is linearised, which is nearly linear there."""
    case = zoo.Case.build(name)
    model, last = case.model, case.model.cfg.n_layers - 1
    base = _baseline(model, case.corrupted, case.scalar)
    for which in ("q", "k"):
        for kind in ("all_pos", "by_pos"):
            sweep = getattr(patching, f"get_act_patch_attn_head_{which}_{kind}")
            exact = sweep(model, case.corrupted, case.clean_cache, case.scalar, progress=False) - base
            star = getattr(refine, f"get_attr_patch_attn_head_{which}_{kind}_atpstar")(model, case.clean, case.corrupted, case.scalar)
            assert star.shape == exact.shape, (which, kind, star.shape, exact.shape)
            scale = float(exact[last].abs().max())
            assert scale > 1e-3
            assert float((star[last] - exact[last]).abs().max()) < 0.2 * scale, (which, kind, star[last], exact[last])


def test_atpstar_reduce_none(case):
    scalar = refine.get_attr_patch_attn_head_k_by_pos_atpstar(case.model, case.clean, case.corrupted, case.scalar)
    per = refine.get_attr_patch_attn_head_k_by_pos_atpstar(case.model, case.clean, case.corrupted, case.per_example, reduce="none")
    assert per.shape == scalar.shape + (case.clean.shape[0],)
    assert_close(per.mean(-1), scalar)


# ---- verify --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sweep, k", [("attn_head_out_by_pos", 10), ("resid_pre", 4), ("attn_head_pattern_dest_src_pos", 6)])
def test_verify_matches_full_exact_sweep_at_top_cells(case, sweep, k):
    model = case.model
    estimate = getattr(nodes, f"get_attr_patch_{sweep}")(model, case.clean, case.corrupted, case.scalar)
    df = refine.verify(model, case.clean, case.corrupted, case.clean_cache, case.scalar, estimate, sweep, k=k)
    axes = list(getattr(patching, f"get_act_patch_{sweep}").keywords["index_axis_names"])
    assert list(df.columns) == axes + ["estimate", "exact", "abs_error"]
    assert len(df) == k
    cells = [tuple(int(v) for v in row) for row in df[axes].itertuples(index=False)]
    # the rows are the top-k cells by |estimate|, in decreasing order
    est = torch.tensor([float(estimate[c]) for c in cells])
    assert_close(torch.tensor(df["estimate"].to_numpy()), est)
    assert (est.abs()[:-1] >= est.abs()[1:]).all()
    kth = float(est.abs().min())
    assert int((estimate.abs() > kth).sum()) <= k - 1
    assert len(set(cells)) == k
    # the exact column is the full exact sweep (minus the corrupted baseline) at those cells
    full = getattr(patching, f"get_act_patch_{sweep}")(model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    effect = full - _baseline(model, case.corrupted, case.scalar)
    assert_close(torch.tensor(df["exact"].to_numpy()), torch.stack([effect[c] for c in cells]).float())


def test_verify_rejects_per_example_estimates(case):
    est = nodes.get_attr_patch_resid_pre(case.model, case.clean, case.corrupted, case.per_example, reduce="none")
    with pytest.raises(ValueError, match="reduce='scalar'"):
        refine.verify(case.model, case.clean, case.corrupted, case.clean_cache, case.scalar, est, "resid_pre")
