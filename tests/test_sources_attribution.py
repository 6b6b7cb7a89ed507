"""Ablation sources as ``source=`` of integrated gradients, GradDrop and AtP* (node sweeps: tests/test_sources.py;
edges: tests/test_attribution_edges.py; stop-gradient variants: tests/test_attribution_stop_gradient.py).

References written here without the library's zero probes, on the GPT-2, GPT-NeoX and LLaMA zoo
models with a zero, mean and resample source respectively:

- ``get_attr_patch_ig(ig_steps=1)`` (midpoint: ``alpha = 0.5``): every layer's ``resid_pre`` set to
  ``corrupted + 0.5 (source - corrupted)`` with an identity backward (``x + (value - x).detach()``),
  plus ``a[l, p] * (source - corrupted)`` at each cell; the estimate is ``d metric / d a`` at 0;
- ``get_attr_patch_graddrop``: for each dropped layer, ``x.detach()`` on its attention and MLP outputs,
  the gradient at each layer's ``hook_mlp_out`` read through a differentiable ``clone()``, contracted
  with ``source - corrupted`` and averaged over the ``L - 1`` drops;
- AtP*'s query estimate: each layer's pattern recomputed by the model with the source's queries in
  that layer, minus the corrupted pattern, times the pattern's gradient at the corrupted run.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies

import fastpatch
from fastpatch import attribution as fa

CASES = [("gpt2", "zero"), ("neox", "mean"), ("llama", "resample")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request):
    name, kind = request.param
    case = zoo.Case.build(name)
    case.source = zoo.ablation_source(case, kind)
    with torch.no_grad():
        _, case.corrupted_cache = case.model.run_with_cache(case.corrupted)
    return case


def _deltas(case, name_of):
    L = case.model.cfg.n_layers
    return [case.source[name_of(l)] - case.corrupted_cache[name_of(l)] for l in range(L)]


def test_ig_with_a_source_equals_autograd_at_the_half_interpolated_run(case):
    model, metric = case.model, case.scalar
    L, n_pos = model.cfg.n_layers, case.corrupted.shape[1]
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    deltas = _deltas(case, lambda l: names[l])
    a = torch.zeros(L, n_pos, requires_grad=True)

    def site(l):
        def hook(x, hook):
            value = case.corrupted_cache[names[l]] + 0.5 * deltas[l]
            return x + (value - x).detach() + a[l][None, :, None] * deltas[l]

        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, site(l)) for l, n in enumerate(names)]):
        (ref,) = torch.autograd.grad(metric(model(case.corrupted)), a)
    ours = fa.get_attr_patch_ig(model, None, case.corrupted, metric, "resid_pre", 1, source=case.source)
    assert fastpatch.hook_count(model) == 0
    assert_varies(ref, "IG with a source")
    assert_close(ours, ref)
    # alpha = 0.5 is not plain attribution (alpha = 0) under another name
    plain = fa.get_attr_patch_resid_pre(model, None, case.corrupted, metric, source=case.source)
    assert float((ours - plain).abs().max()) > 0.05 * float(ref.abs().max())


def test_graddrop_with_a_source_equals_a_plain_loop(case):
    model, metric = case.model, case.scalar
    L = model.cfg.n_layers
    names = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    deltas = _deltas(case, lambda l: names[l])
    per_drop = []
    for drop in range(L):
        outs = {}

        def keep(act, hook):
            outs[hook.name] = act.clone()  # differentiable copy the model consumes: its grad is the activation's
            return outs[hook.name]

        stops = [(f"blocks.{drop}.hook_attn_out", lambda act, hook: act.detach()),
                 (f"blocks.{drop}.hook_mlp_out", lambda act, hook: act.detach())]
        with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names] + stops):
            grads = torch.autograd.grad(metric(model(case.corrupted)), [outs[n] for n in names], allow_unused=True)
        per_drop.append(torch.stack([torch.zeros(deltas[l].shape[1]) if g is None else (deltas[l] * g).sum((0, 2))
                                     for l, g in enumerate(grads)]))
    ref = torch.stack(per_drop).sum(0) / (L - 1)
    ours = fa.get_attr_patch_graddrop(model, None, case.corrupted, metric, "mlp_out", source=case.source)
    assert fastpatch.hook_count(model) == 0
    assert_varies(ref, "GradDrop with a source")
    assert_close(ours, ref)
    plain = fa.get_attr_patch_mlp_out(model, None, case.corrupted, metric, source=case.source)
    assert float((ours[:-1] - plain[:-1]).abs().max()) > 1e-2 * float(plain.abs().max())  # the drops matter


def test_atpstar_with_a_source_equals_the_exact_pattern_loop(case):
    """AtP*'s query estimate: layer ``l``'s pattern recomputed by the model with the source's queries
    in that layer, ``(pattern - corrupted pattern) . d metric / d pattern`` at the corrupted run."""
    model, metric = case.model, case.scalar
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    outs = {}

    def keep(act, hook):
        outs[hook.name] = act.clone()
        return outs[hook.name]

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        grads = torch.autograd.grad(metric(model(case.corrupted)), [outs[n] for n in names])
    ref = []
    for l, g in enumerate(grads):
        seen = {}
        hooks = [(f"blocks.{l}.attn.hook_q", lambda act, hook: case.source[hook.name].expand_as(act)),
                 (names[l], lambda act, hook: seen.setdefault("pattern", act.detach().clone()))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(case.corrupted)
        ref.append(((seen["pattern"] - case.corrupted_cache[names[l]]) * g).sum((0, 2, 3)))
    ref = torch.stack(ref)
    ours = fa.get_attr_patch_attn_head_q_all_pos_atpstar(model, None, case.corrupted, metric, source=case.source)
    assert fastpatch.hook_count(model) == 0
    assert_varies(ref, "AtP* with a source")
    assert_close(ours, ref)
