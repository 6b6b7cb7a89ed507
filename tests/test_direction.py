"""direction="denoising" | "noising": each equals the argument swap it stands for.

Exact sweeps (``fastpatch.patching.run_sweep``) against TransformerLens's own functions called with
the swapped arguments; attribution (``direction=`` on every node function) against the same
function with the two token arguments swapped; ``verify(direction="noising")`` against
TransformerLens's sweep on the clean run.
"""

from functools import lru_cache

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

from fastpatch import attribution as fa
from fastpatch import patching as fp
from fastpatch.sources import resample_ablation

MODELS = ("gpt2", "neox", "llama")
# GPT-2 by default; the other models are marked slow (CI runs them)
FAST_GPT2 = [pytest.param(m, marks=() if m == "gpt2" else pytest.mark.slow) for m in MODELS]


@lru_cache(maxsize=None)
def _case(name):
    case = zoo.Case.build(name)
    with torch.no_grad():
        _, case.corrupted_cache = case.model.run_with_cache(case.corrupted)
    return case


@lru_cache(maxsize=None)
def _expected(name):
    """TransformerLens's head-out sweep with the arguments each direction stands for."""
    case = _case(name)
    model, metric, sweep = case.model, case.scalar, tl.get_act_patch_attn_head_out_all_pos
    return {
        "denoising": sweep(model, case.corrupted, case.clean_cache, metric),
        "noising": sweep(model, case.clean, case.corrupted_cache, metric),
    }


@lru_cache(maxsize=None)
def _expected_gpt2_extras():
    """TransformerLens with a resample source noising the clean run, and a noising direct path."""
    case = _case("gpt2")
    model, metric = case.model, case.scalar
    source = resample_ablation(model, case.corrupted, seed=1)
    return {
        "source": (source, tl.get_act_patch_attn_head_out_all_pos(model, case.clean, source, metric)),
        "path": tl.get_act_patch_direct_path(model, case.clean, case.corrupted_cache, case.clean_cache, metric,
                                             0, 0, verbose=False),
    }


@pytest.mark.parametrize("backend", ["hooks", "native"])
@pytest.mark.parametrize("name", FAST_GPT2)
def test_exact_directions_equal_transformer_lens_with_swapped_arguments(name, backend):
    case, expected = _case(name), _expected(name)
    model, metric = case.model, case.scalar
    sweep = fp.get_act_patch_attn_head_out_all_pos
    kw = dict(backend=backend, progress=False)
    for direction in ("denoising", "noising"):
        assert_varies(expected[direction], direction)
        ours = fp.run_sweep(sweep, model, case.clean, case.corrupted, metric, direction=direction, **kw)
        assert_close(ours, expected[direction])
    assert not torch.allclose(expected["denoising"], expected["noising"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hooks", "native"])
def test_noising_with_a_source_and_direct_paths_equal_transformer_lens(backend):
    case, expected = _case("gpt2"), _expected_gpt2_extras()
    model, metric = case.model, case.scalar
    sweep = fp.get_act_patch_attn_head_out_all_pos
    kw = dict(backend=backend, progress=False)
    # a source stands in for the run whose activations are patched in: noising the clean run with it
    source, ref = expected["source"]
    assert_close(fp.run_sweep(sweep, model, case.clean, None, metric, direction="noising", source=source, **kw), ref)
    ours = fp.run_sweep(fp.get_act_patch_direct_path, model, case.clean, case.corrupted, metric, direction="noising",
                        src_layer=0, src_head=0, verbose=False, backend=backend)
    assert_varies(expected["path"][1:], "noising direct paths")
    assert_close(ours, expected["path"])


def _check_swaps(calls, case):
    for name, call in calls.items():
        swapped = call(case.corrupted, case.clean)
        denoising = call(case.clean, case.corrupted, direction="denoising")
        noising = call(case.clean, case.corrupted, direction="noising")
        for key in swapped if isinstance(swapped, dict) else [None]:
            pick = (lambda r: r[key]) if key is not None else (lambda r: r)
            assert_varies(pick(swapped), f"{name} {key}")
            assert_close(pick(noising), pick(swapped))
            assert not torch.allclose(pick(noising), pick(denoising))


@pytest.mark.parametrize("name", MODELS)
def test_attribution_noising_is_the_argument_swap(name):
    case = _case(name)
    model, metric = case.model, case.scalar
    _check_swaps({
        "nodes": lambda a, b, **kw: fa.attribute_nodes(model, a, b, metric, ["resid_pre", "attn_head_q_by_pos"], **kw),
    }, case)
    # the named node functions take direction= too
    assert_close(fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, metric, direction="noising"),
                 fa.get_attr_patch_resid_pre(model, case.corrupted, case.clean, metric))


def test_verify_measures_a_noising_estimate_on_the_clean_run():
    """``verify(direction="noising")`` patches the given cache into the clean run, as TransformerLens's
    sweep with the corrupted cache on the clean tokens (minus the clean baseline)."""
    case = _case("gpt2")
    model, metric, sweep = case.model, case.scalar, "attn_head_out_all_pos"
    estimate = fa.get_attr_patch_attn_head_out_all_pos(model, case.clean, case.corrupted, metric, direction="noising")
    table = fa.verify(model, case.clean, None, case.corrupted_cache, metric, estimate, sweep, k=4, direction="noising")
    with torch.no_grad():
        ref = _expected("gpt2")["noising"] - metric(model(case.clean))
    exact = torch.tensor([float(ref[row.layer, row.head]) for row in table.itertuples()])
    assert_varies(exact, "verified noising cells")
    assert_close(torch.tensor(table["exact"].to_numpy()), exact)
    assert_close(torch.tensor(table["estimate"].to_numpy()), estimate.flatten()[estimate.abs().flatten().argsort(descending=True, stable=True)[:4]])
    with pytest.raises(ValueError, match="clean_tokens is None: with direction='noising'"):
        fa.verify(model, None, case.corrupted, case.corrupted_cache, metric, estimate, sweep, direction="noising")


@pytest.mark.slow
def test_every_attribution_method_takes_the_direction():
    """IG, GradDrop and AtP* resolve the direction as the node functions do (``passes.resolve_runs``)."""
    case = _case("gpt2")
    model, metric = case.model, case.scalar
    _check_swaps({
        "ig": lambda a, b, **kw: fa.get_attr_patch_ig(model, a, b, metric, "attn_head_out_all_pos", 1, **kw),
        "graddrop": lambda a, b, **kw: fa.get_attr_patch_graddrop(model, a, b, metric, "mlp_out", **kw),
        "atpstar": lambda a, b, **kw: fa.get_attr_patch_attn_head_q_all_pos_atpstar(model, a, b, metric, **kw),
    }, case)


def test_bad_directions_are_refused():
    case = _case("gpt2")
    model, metric = case.model, case.scalar
    with pytest.raises(ValueError, match="direction must be one of"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, metric, direction="forward")
    with pytest.raises(ValueError, match="direction must be one of"):
        fp.run_sweep(fp.get_act_patch_resid_pre, model, case.clean, case.corrupted, metric, direction="backward")
    source = resample_ablation(model, case.corrupted)
    with pytest.raises(ValueError, match="give corrupted_tokens or source=, not both"):
        fp.run_sweep(fp.get_act_patch_resid_pre, model, case.clean, case.corrupted, metric, direction="noising",
                     source=source)
    with pytest.raises(ValueError, match="clean_tokens is None: with direction='noising' it is the run that is patched"):
        fa.get_attr_patch_resid_pre(model, None, case.corrupted, metric, direction="noising")
