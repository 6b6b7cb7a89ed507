"""Attention-score patching ("attn_scores" with TransformerLens's pattern setters) and its attribution.

Exact sweeps against ``transformer_lens.patching.generic_activation_patch`` on ``attn_scores``
(the causal mask's -inf is valid input, NaN is not); attribution against autograd through a
per-cell interpolation hook on the scores.
"""

import warnings
from functools import lru_cache

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

import fastpatch
from fastpatch import attribution as fa
from fastpatch import patching as fp
from fastpatch.engine.native.cells import corrupted_scores
from fastpatch.engine.native.model import NativeModel
from fastpatch.sources import zero_ablation

MODELS = ("gpt2", "neox", "llama")
SCORES = "blocks.{}.attn.hook_attn_scores"
ALL_POS = ("all_pos", tl.layer_head_pattern_patch_setter, ["layer", "head_index"])
BY_POS = ("by_pos", tl.layer_head_pos_pattern_patch_setter, ["layer", "head_index", "dest_pos"])
# all positions on every model by default; by position (one TransformerLens forward per
# layer x head x position) is marked slow (CI runs it)
SWEEPS = [pytest.param(m, *ALL_POS) for m in MODELS] + [pytest.param(m, *BY_POS, marks=pytest.mark.slow) for m in MODELS]
FAST_GPT2 = [pytest.param(m, marks=() if m == "gpt2" else pytest.mark.slow) for m in MODELS]
_case = lru_cache(maxsize=None)(zoo.Case.build)


@pytest.mark.parametrize("name, sweep, setter, axes", SWEEPS)
def test_score_sweeps_equal_transformer_lens(name, sweep, setter, axes):
    case = _case(name)
    model, metric = case.model, case.per_example
    ref = tl.generic_activation_patch(model, case.corrupted, case.clean_cache, metric, setter, "attn_scores", axes,
                                      reduce="mean")
    assert_varies(ref, f"scores {sweep}")
    ours = getattr(fp, f"get_act_patch_attn_head_scores_{sweep}")
    for backend in ("native", "hooks", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto must not fall back
            got = ours(model, case.corrupted, case.clean_cache, metric, reduce="mean", backend=backend, progress=False)
        assert fastpatch.last_run_stats()["backend"] == ("hooks" if backend == "hooks" else "native")
        assert_close(got, ref)


def test_single_and_ablated_score_patches_equal_transformer_lens():
    """One (dest, src) score per cell: the rest of the row keeps the corrupted run's scores, so the native
    backend's corrupted scores (mask included) must be the model's; and whole heads from a zero-ablation source."""
    case = _case("gpt2")
    model, metric = case.model, case.per_example
    ref = tl.generic_activation_patch(model, case.corrupted, case.clean_cache, metric,
                                      tl.layer_head_dest_src_pos_pattern_patch_setter, "attn_scores",
                                      ["layer", "head_index", "dest_pos", "src_pos"], reduce="mean")
    assert_varies(ref, "single scores")
    got = fp.get_act_patch_attn_head_scores_dest_src_pos(model, case.corrupted, case.clean_cache, metric, reduce="mean",
                                                         backend="native", progress=False)
    assert fastpatch.last_run_stats()["backend"] == "native"
    assert_close(got, ref)
    # a zero-ablation source (0 where visible, the mask's -inf kept): uniform attention over the visible keys
    zero = zero_ablation(model, case.corrupted)
    _, setter, axes = ALL_POS
    ref = tl.generic_activation_patch(model, case.corrupted, zero, metric, setter, "attn_scores", axes, reduce="mean")
    assert_varies(ref, "zero-ablated scores")
    got = fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, zero, metric, reduce="mean", backend="native",
                                                    progress=False)
    assert fastpatch.last_run_stats()["backend"] == "native"
    assert_close(got, ref)


@pytest.mark.parametrize("name", ["gemma2", "bloom"])
def test_native_scores_are_the_hooks(name):
    """The native corrupted scores sit where the bridge's hook_attn_scores does: after the scale, ALiBi (bloom)
    and the soft cap (gemma2), with the causal mask and the sliding window (gemma2, layer 0) applied; the native
    trace computes them only once a score patch asks. A native score sweep then equals TransformerLens's."""
    case = zoo.arch_case(name)
    model = case.model
    with torch.no_grad():
        _, cache = model.run_with_cache(case.corrupted)
        engine = NativeModel.checked(model, case.corrupted)
    assert engine.trace.attn_scores == {}
    for layer in range(model.cfg.n_layers):
        theirs = cache[SCORES.format(layer)]
        ours = corrupted_scores(engine.native, engine.trace, layer)
        hidden = torch.isneginf(ours)
        assert hidden.any()
        assert torch.equal(hidden, theirs <= torch.finfo(theirs.dtype).min)  # -inf, or finfo.min outside compatibility mode
        assert_close(ours[~hidden], theirs[~hidden])
        assert_varies(theirs[~hidden], f"{name} scores")
    assert sorted(engine.trace.attn_scores) == list(range(model.cfg.n_layers))
    _, setter, axes = ALL_POS
    ref = tl.generic_activation_patch(model, case.corrupted, case.clean_cache, case.per_example, setter, "attn_scores",
                                      axes, reduce="mean")
    assert_varies(ref, f"{name} score sweep")
    got = fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, case.clean_cache, case.per_example,
                                                    reduce="mean", backend="native", progress=False)
    assert fastpatch.last_run_stats()["backend"] == "native"
    assert_close(got, ref)


def test_masked_scores_are_valid_but_nan_is_not():
    case = _case("gpt2")
    name = SCORES.format(1)
    assert torch.isneginf(case.clean_cache[name]).any()
    for bad in (float("nan"), float("inf")):
        cache = dict(case.clean_cache.items())
        cache[name] = cache[name].clone()
        cache[name][0, 0, 3, 1] = bad  # a causal (unmasked) entry
        with pytest.raises(ValueError, match=r"hook_attn_scores'\] contains NaN or infinite values \(-inf is allowed"):
            fp.get_act_patch_attn_head_scores_all_pos(case.model, case.corrupted, cache, case.scalar, progress=False)


def test_no_state_left_when_a_native_score_sweep_raises():
    """A metric raising mid-sweep, and NaN scores refused, on the native score path (whose corrupted scores are
    computed on first use): no hook or flag is left on the model, and the next call gives the same values."""
    case = _case("gpt2")
    model = case.model
    flags, calls = fastpatch.model_flags(model), []

    def failing(logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("metric failed")
        return case.scalar(logits)

    with pytest.raises(RuntimeError, match="metric failed"):
        fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, case.clean_cache, failing, backend="native",
                                                  chunk_size=2, progress=False)
    cache = dict(case.clean_cache.items())
    cache[SCORES.format(0)] = cache[SCORES.format(0)].clone()
    cache[SCORES.format(0)][0, 0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, cache, case.scalar, backend="native",
                                                  progress=False)
    assert fastpatch.hook_count(model) == 0 and fastpatch.model_flags(model) == flags
    after = fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, case.clean_cache, case.scalar,
                                                      backend="native", progress=False)
    hooks = fp.get_act_patch_attn_head_scores_all_pos(model, case.corrupted, case.clean_cache, case.scalar,
                                                      backend="hooks", progress=False)
    assert_varies(hooks, "scores all_pos")
    assert_close(after, hooks)


def _autograd_scores(model, tokens, metric, source, broadcast, grid):
    """d metric / d alpha at 0 with each layer's scores set to ``s + alpha * (source - s)`` (0 where
    both are -inf), ``alpha`` one number per cell of ``grid`` (``broadcast`` puts it on ``[batch, head, dest, src]``)."""
    n_layers = model.cfg.n_layers
    alpha = torch.zeros(n_layers, *grid, requires_grad=True)

    def interpolate(s, hook, layer):
        src = source[SCORES.format(layer)]
        step = torch.where(src == s, torch.zeros_like(s), src - s).detach()
        return s + broadcast(alpha[layer]) * step

    hooks = [(SCORES.format(layer), lambda s, hook, layer=layer: interpolate(s, hook, layer)) for layer in range(n_layers)]
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(metric(model.run_with_hooks(tokens, fwd_hooks=hooks)), alpha)
    return grad


@pytest.mark.parametrize("name", FAST_GPT2)
def test_score_attribution_equals_autograd(name):
    case = _case(name)
    model, metric = case.model, case.scalar
    n_heads, n_pos = model.cfg.n_heads, case.corrupted.shape[1]
    zero = zero_ablation(model, case.corrupted)
    for source, kw in ((case.clean_cache, dict(clean_tokens=case.clean)), (zero, dict(clean_tokens=None, source=zero))):
        clean = kw.pop("clean_tokens")
        all_pos = fa.get_attr_patch_attn_head_scores_all_pos(model, clean, case.corrupted, metric, **kw)
        by_pos = fa.get_attr_patch_attn_head_scores_by_pos(model, clean, case.corrupted, metric, **kw)
        ref_all = _autograd_scores(model, case.corrupted, metric, source, lambda a: a[None, :, None, None], (n_heads,))
        ref_by = _autograd_scores(model, case.corrupted, metric, source, lambda a: a[None, :, :, None], (n_heads, n_pos))
        for ours, ref in ((all_pos, ref_all), (by_pos, ref_by)):
            assert torch.isfinite(ours).all()
            assert_varies(ref, "score attribution")
            assert_close(ours, ref)
    # integrated gradients sets the scores (mask included) in the forward: one left step is plain attribution
    plain = fa.get_attr_patch_attn_head_scores_all_pos(model, case.clean, case.corrupted, metric)
    ig = fa.get_attr_patch_ig(model, case.clean, case.corrupted, metric, "attn_head_scores_all_pos", 1, rule="left")
    assert_close(ig, plain)
    # GradDrop: a last-layer node reaches the metric only directly, so its estimate is plain attribution
    dropped = fa.get_attr_patch_graddrop(model, case.clean, case.corrupted, metric, "attn_head_scores_all_pos")
    assert torch.isfinite(dropped).all()
    assert_varies(plain[-1], "last-layer score attribution")
    assert_close(dropped[-1], plain[-1])
