"""Attention attribution (fastpatch.attribution.get_attention_attribution) and the per-cell
attention-pattern attribution patching estimate (get_attr_patch_attn_head_pattern_dest_src_pos).

References are written here with plain autograd, not with the library's zero probes: the pattern
is read through ``clone()`` in a forward hook (the model consumes the clone, so its gradient is
the pattern's), or replaced by a leaf tensor ``alpha * pattern`` for the integrated version.
Checked: equality with those references (float32), the exact scaling identity of the
non-integrated score, completeness of the integrated one (measured: midpoint-rule error shrinks
~1/n^2 towards ``metric(A) - metric(layer pattern := 0)``), per-prompt conventions, variation
across cells, no hooks left, and clear refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies

import fastpatch
from fastpatch import attribution as fa


def _pattern_names(model):
    return [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]


def _grad_at_patterns(model, tokens, metric):
    """(patterns, d metric / d pattern) at every layer, ``[batch, head, dest, src]`` each, by autograd."""
    outs = {}

    def keep(act, hook):
        outs[hook.name] = act.clone()
        return outs[hook.name]

    names = _pattern_names(model)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        value = metric(model(tokens))
        grads = torch.autograd.grad(value, [outs[n] for n in names])
    return [outs[n].detach() for n in names], list(grads)


def _metric_with_scaled_pattern(model, tokens, metric, layer, scale):
    def hook(act, hook):
        return act * scale

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)]):
        return metric(model(tokens))


# ---- non-integrated ---------------------------------------------------------------------------------
def test_attention_attribution_equals_autograd_reference(zoo_case):
    case = zoo_case
    model = case.model
    ours = fa.get_attention_attribution(model, case.clean, case.scalar)
    patterns, grads = _grad_at_patterns(model, case.clean, case.scalar)
    expected = torch.stack([(p * g).sum(0) for p, g in zip(patterns, grads)])
    cfg = model.cfg
    n_pos = case.clean.shape[1]
    assert ours.shape == (cfg.n_layers, cfg.n_heads, n_pos, n_pos)
    assert_varies(expected, "pattern * grad")
    assert_close(ours, expected)
    # causal: nothing above the diagonal
    assert float(ours.triu(1).abs().max()) == 0.0
    assert fastpatch.hook_count(model) == 0


def test_layer_sum_is_the_derivative_of_scaling_that_layer(zoo_case):
    """sum over one layer's cells of A * dF/dA == d F(alpha * A_l) / d alpha at alpha = 1 (chain rule)."""
    case = zoo_case
    model = case.model
    ours = fa.get_attention_attribution(model, case.clean, case.scalar)
    for layer in range(model.cfg.n_layers):
        alpha = torch.ones((), requires_grad=True)
        with torch.enable_grad():
            value = _metric_with_scaled_pattern(model, case.clean, case.scalar, layer, alpha)
            (expected,) = torch.autograd.grad(value, alpha)
        scale = float(ours.abs().sum())
        assert abs(float(ours[layer].sum()) - float(expected)) <= 1e-5 * scale, (layer, float(ours[layer].sum()), float(expected))


def test_reduce_none_is_per_prompt(zoo_case):
    """Batch-mean metric with reduce='scalar' == mean of the per-prompt scores; prompt i's column is prompt i alone."""
    case = zoo_case
    model = case.model
    scalar = fa.get_attention_attribution(model, case.clean, case.scalar)
    per = fa.get_attention_attribution(model, case.clean, case.per_example, reduce="none")
    assert per.shape == scalar.shape + (case.clean.shape[0],)
    assert_close(per.mean(-1), scalar)
    answer = int(case.clean[1, -1])
    alone = fa.get_attention_attribution(model, case.clean[1:2], lambda logits: logits[0, -1].log_softmax(-1)[answer])
    assert_close(alone, per[..., 1])


# ---- integrated ------------------------------------------------------------------------------------
def _integrated_reference(model, tokens, metric, steps, rule):
    """Hao et al.'s integrated attribution by a plain loop: per layer and alpha, the pattern is replaced by a leaf."""
    patterns, _ = _grad_at_patterns(model, tokens, metric)
    out = []
    for layer, pattern in enumerate(patterns):
        total = torch.zeros_like(pattern)
        for k in range(steps):
            alpha = (k + 1) / steps if rule == "right" else (k + 0.5) / steps
            leaf = (alpha * pattern).requires_grad_(True)

            def replace(act, hook, leaf=leaf):
                return leaf

            with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", replace)]):
                (grad,) = torch.autograd.grad(metric(model(tokens)), leaf)
            total += grad
        out.append((pattern * total / steps).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("rule", ["right", "midpoint"])
def test_integrated_equals_plain_loop(zoo_case, rule):
    case = zoo_case
    model = case.model
    ours = fa.get_attention_attribution(model, case.clean, case.scalar, integrated=True, ig_steps=2, rule=rule)
    expected = _integrated_reference(model, case.clean, case.scalar, 2, rule)
    assert_varies(expected, "integrated attention attribution")
    assert_close(ours, expected)
    plain = fa.get_attention_attribution(model, case.clean, case.scalar)
    assert not torch.allclose(ours, plain)  # the integral is not the gradient at alpha = 1
    assert fastpatch.hook_count(model) == 0


def test_integrated_one_right_step_is_the_plain_score(zoo_case):
    case = zoo_case
    plain = fa.get_attention_attribution(case.model, case.clean, case.scalar)
    one = fa.get_attention_attribution(case.model, case.clean, case.scalar, integrated=True, ig_steps=1, rule="right")
    assert_close(one, plain)
    per = fa.get_attention_attribution(case.model, case.clean, case.per_example, integrated=True, ig_steps=2, reduce="none")
    assert_close(per.mean(-1), fa.get_attention_attribution(case.model, case.clean, case.scalar, integrated=True, ig_steps=2))


def test_integrated_completeness_per_layer():
    """Summed over one layer's cells, the integral -> metric(A) - metric(that layer's pattern := 0).

    Measured on the zoo gpt2 before writing the bounds (midpoint rule, errors per layer):
    n=2: ~1e-2, n=8: ~2e-3..2e-4, n=32: ~1e-4..1e-5 against differences of ~0.7-0.8; the right
    (Hao et al.) rule converges like 1/n (n=32: ~3e-2 relative on layer 0). The zoo LLaMA's
    layer 0 is much rougher in alpha (RMSNorm at position 0 where the residual is the embedding
    alone), so its quadrature converges erratically; it is not used here.
    """
    case = zoo.Case.build("gpt2")
    model = case.model
    with torch.no_grad():
        full = float(case.scalar(model(case.clean)))
        targets = [full - float(_metric_with_scaled_pattern(model, case.clean, case.scalar, l, 0.0)) for l in range(model.cfg.n_layers)]
    assert min(abs(t) for t in targets) > 0.1

    def errors(steps, rule):
        sums = fa.get_attention_attribution(model, case.clean, case.scalar, integrated=True, ig_steps=steps, rule=rule).sum((1, 2, 3))
        return [abs(float(s) - t) for s, t in zip(sums, targets)]

    coarse, fine = errors(2, "midpoint"), errors(32, "midpoint")
    for layer, (c, f, t) in enumerate(zip(coarse, fine, targets)):
        assert f < 5e-4 * abs(t), (layer, f, t)
        assert f < 0.1 * c, (layer, c, f)
    right = errors(32, "right")
    for layer, (r, t) in enumerate(zip(right, targets)):
        assert r < 0.05 * abs(t), (layer, r, t)


# ---- per-cell pattern attribution patching (clean vs corrupted) --------------------------------------
def test_pattern_dest_src_attribution_patching_equals_autograd_reference(zoo_case):
    """``(pattern_clean - pattern_corrupted) * d metric / d pattern`` at the corrupted run, per
    (layer, head, dest, src), batch summed: the existing nodes sweep, against plain autograd; and
    its (dest, src) sums are the all-positions pattern sweep."""
    case = zoo_case
    model = case.model
    ours = fa.get_attr_patch_attn_head_pattern_dest_src_pos(model, case.clean, case.corrupted, case.scalar)
    clean_patterns, _ = _grad_at_patterns(model, case.clean, case.scalar)
    corrupted_patterns, grads = _grad_at_patterns(model, case.corrupted, case.scalar)
    expected = torch.stack([((c - p) * g).sum(0) for c, p, g in zip(clean_patterns, corrupted_patterns, grads)])
    assert_varies(expected, "pattern attribution patching")
    assert_close(ours, expected)
    all_pos = fa.get_attr_patch_attn_head_pattern_all_pos(model, case.clean, case.corrupted, case.scalar)
    assert_close(ours.sum((-2, -1)), all_pos)


# ---- hygiene and refusals ----------------------------------------------------------------------------
def test_attention_attribution_leaves_the_model_alone_and_refuses_bad_input():
    case = zoo.Case.build("gpt2")
    model = case.model
    flags = fastpatch.model_flags(model)
    fa.get_attention_attribution(model, case.clean, case.scalar)
    fa.get_attention_attribution(model, case.clean, case.scalar, integrated=True, ig_steps=2)
    assert fastpatch.hook_count(model) == 0 and fastpatch.model_flags(model) == flags
    assert all(p.grad is None for p in model.parameters())
    copy.deepcopy(model)  # no autograd graph left on the model's modules

    with pytest.raises(ValueError, match="2-D"):
        fa.get_attention_attribution(model, case.clean[0], case.scalar)
    with pytest.raises(ValueError, match="integer token ids"):
        fa.get_attention_attribution(model, case.clean.float(), case.scalar)
    with pytest.raises(ValueError, match="vocabulary"):
        fa.get_attention_attribution(model, case.clean + 1000, case.scalar)
    with pytest.raises(ValueError, match="reduce"):
        fa.get_attention_attribution(model, case.clean, case.scalar, reduce="mean")
    with pytest.raises(ValueError, match="0-d scalar"):
        fa.get_attention_attribution(model, case.clean, case.per_example)
    with pytest.raises(ValueError, match="ig_steps"):
        fa.get_attention_attribution(model, case.clean, case.scalar, integrated=True, ig_steps=0)
    with pytest.raises(ValueError, match="rule"):
        fa.get_attention_attribution(model, case.clean, case.scalar, integrated=True, rule="left")

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        fa.get_attention_attribution(model, case.clean, broken)
    assert fastpatch.hook_count(model) == 0
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation mode"):
            fa.get_attention_attribution(model, case.clean, case.scalar)
    finally:
        model.eval()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="inference_mode"):
            fa.get_attention_attribution(model, case.clean, case.scalar)
    assert fastpatch.hook_count(model) == 0
