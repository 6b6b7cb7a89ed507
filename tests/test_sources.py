"""Ablation sources (fastpatch.sources): zero, mean and resample caches as the source of every
exact sweep, direct path patching and attribution.

References: the caches against the model's own ``run_with_cache`` (zeros, batch means, a
permutation); exact sweeps and direct paths against TransformerLens's own functions called with
the same cache; attribution against autograd through a per-cell interpolation hook.
"""

from functools import lru_cache, partial

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

import fastpatch
from fastpatch import attribution as fa
from fastpatch import patching as fp
from fastpatch.sources import SourceCache, mean_ablation, zero_ablation

MODELS = ("gpt2", "neox", "llama")
KINDS = ("zero", "mean", "resample")
BACKENDS = ("hooks", "native")
# every (model, kind) pair; the diagonal runs by default, the rest is marked slow (CI runs it)
DIAGONAL = list(zip(MODELS, KINDS))
PAIRS = [pytest.param(m, k, marks=() if (m, k) in DIAGONAL else pytest.mark.slow) for m in MODELS for k in KINDS]
REFERENCE = zoo.MEAN_REFERENCE  # the mean source's reference prompts


@lru_cache(maxsize=None)
def _case(name):
    """The zoo case and its three sources (built once per model per process)."""
    case = zoo.Case.build(name)
    case.sources = {kind: zoo.ablation_source(case, kind) for kind in KINDS}
    return case


@pytest.mark.parametrize("name", MODELS)
def test_caches_hold_the_ablated_run(name):
    case = _case(name)
    model, sources, reference_tokens = case.model, case.sources, REFERENCE
    with torch.no_grad():
        _, ref = model.run_with_cache(reference_tokens)
    batch = case.clean.shape[0]
    perm = sources["resample"].permutation
    assert sorted(perm.tolist()) == list(range(batch)) and perm.tolist() != list(range(batch))
    per_all = mean_ablation(model, reference_tokens, per_position=False, batch=batch)
    for name in ("blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.2.attn.hook_pattern"):
        for kind in KINDS:
            assert isinstance(sources[kind], SourceCache) and sources[kind].kind == kind
            assert sources[kind][name].shape == case.clean_cache[name].shape
        assert torch.equal(sources["zero"][name], torch.zeros_like(case.clean_cache[name]))
        assert_close(sources["mean"][name], ref[name].mean(0, keepdim=True).expand(batch, *ref[name].shape[1:]))
        assert torch.equal(sources["resample"][name], case.clean_cache[name][perm])
    name = "blocks.1.hook_resid_pre"
    assert_close(per_all[name], ref[name].mean((0, 1), keepdim=True).expand(batch, *ref[name].shape[1:]))
    # attention: the mean stays per (dest, src) and zero scores keep the causal mask
    assert_close(per_all["blocks.0.attn.hook_pattern"], sources["mean"]["blocks.0.attn.hook_pattern"])
    scores = sources["zero"]["blocks.0.attn.hook_attn_scores"]
    masked = torch.isneginf(case.clean_cache["blocks.0.attn.hook_attn_scores"])
    assert masked.any() and torch.isneginf(scores[masked]).all() and (scores[~masked] == 0).all()


# (activation name, setter, index axes): head outputs on the diagonal, the residual stream by
# position off it
HEADS = ("z", tl.layer_head_vector_patch_setter, ["layer", "head"])
RESID = ("resid_pre", tl.layer_pos_patch_setter, ["layer", "pos"])


@pytest.mark.parametrize("name, kind", PAIRS)
def test_exact_sweeps_equal_transformer_lens_with_the_source(name, kind):
    case = _case(name)
    source = case.sources[kind]
    act, setter, axes = HEADS if (name, kind) in DIAGONAL else RESID
    ref = tl.generic_activation_patch(case.model, case.corrupted, source, case.per_example, setter, act, axes,
                                      reduce="mean")
    assert_varies(ref, f"{kind} {act}")
    for backend in BACKENDS:
        ours = fp.generic_activation_patch(
            case.model, case.corrupted, source, case.per_example, setter, act, axes, reduce="mean", backend=backend,
            progress=False,
        )
        assert_close(ours, ref)


@pytest.mark.parametrize("name, kind", [pytest.param(m, k, marks=() if m == "gpt2" else pytest.mark.slow)
                                        for m, k in DIAGONAL])
def test_direct_paths_equal_transformer_lens_with_the_source(name, kind):
    case = _case(name)
    sources = case.sources
    with torch.no_grad():
        _, corrupted_cache = case.model.run_with_cache(case.corrupted)
    args = (case.model, case.corrupted, sources[kind], corrupted_cache, case.scalar, 0, 1)
    ref = tl.get_act_patch_direct_path(*args, component="q", verbose=False)
    assert_varies(ref[1:], f"{kind} direct paths")
    for backend in BACKENDS:
        assert_close(fp.get_act_patch_direct_path(*args, component="q", verbose=False, backend=backend), ref)


def _autograd_estimate(model, tokens, metric, source, act, broadcast):
    """d metric / d alpha at alpha = 0 with each layer's ``act`` set to ``x + alpha * (source - x)``,
    ``alpha`` one number per cell (``broadcast`` puts a layer's cell grid on the activation's axes)."""
    names = [f"blocks.{layer}.{'attn.hook_z' if act == 'z' else 'hook_resid_pre'}" for layer in range(model.cfg.n_layers)]
    first = source[names[0]]
    grid = (first.shape[1],) if act == "resid_pre" else (first.shape[2],)
    alpha = torch.zeros(len(names), *grid, requires_grad=True)

    def interpolate(x, hook, layer):
        return x + broadcast(alpha[layer]) * (source[names[layer]] - x).detach()

    hooks = [(name, partial(interpolate, layer=layer)) for layer, name in enumerate(names)]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        (grad,) = torch.autograd.grad(metric(logits), alpha)
    return grad


@pytest.mark.parametrize("name, kind", PAIRS)
def test_attribution_with_the_source_equals_autograd(name, kind):
    case = _case(name)
    source, model = case.sources[kind], case.model
    resid = fa.get_attr_patch_resid_pre(model, None, case.corrupted, case.scalar, source=source)
    heads = fa.get_attr_patch_attn_head_out_all_pos(model, None, case.corrupted, case.scalar, source=source)
    ref_resid = _autograd_estimate(model, case.corrupted, case.scalar, source, "resid_pre", lambda a: a[None, :, None])
    ref_heads = _autograd_estimate(model, case.corrupted, case.scalar, source, "z", lambda a: a[None, None, :, None])
    for ours, ref in ((resid, ref_resid), (heads, ref_heads)):
        assert_varies(ref, kind)
        assert_close(ours, ref)


def test_verify_measures_an_estimate_with_the_source():
    """``attribution.verify`` patches the source in exactly, as TransformerLens does with that cache."""
    case = _case("gpt2")
    model, metric, source = case.model, case.scalar, case.sources["zero"]
    estimate = fa.get_attr_patch_attn_head_out_all_pos(model, None, case.corrupted, metric, source=source)
    table = fa.verify(model, None, case.corrupted, source, metric, estimate, "attn_head_out_all_pos", k=4)
    with torch.no_grad():
        ref = tl.get_act_patch_attn_head_out_all_pos(model, case.corrupted, source, metric) - metric(model(case.corrupted))
    exact = torch.tensor([float(ref[row.layer, row.head]) for row in table.itertuples()])
    assert_varies(exact, "verified cells")
    assert_close(torch.tensor(table["exact"].to_numpy()), exact)


@pytest.mark.slow
def test_every_attribution_function_reads_a_source_like_a_clean_run():
    """A plain clean cache given as ``source=`` gives the same estimate as the clean tokens (on GPT-2:
    the plumbing, ``passes.resolve_runs`` / ``patch_values``, is the same for every model)."""
    case = _case("gpt2")
    model, metric = case.model, case.scalar
    src = dict(source=case.clean_cache)
    calls = {
        "nodes": lambda c, **kw: fa.attribute_nodes(model, c, case.corrupted, metric, ["attn_head_v_all_pos"], **kw)[
            "attn_head_v_all_pos"
        ],
        "ig": lambda c, **kw: fa.get_attr_patch_ig(model, c, case.corrupted, metric, "mlp_out", 1, **kw),
        "graddrop": lambda c, **kw: fa.get_attr_patch_graddrop(model, c, case.corrupted, metric, **kw),
        "atpstar": lambda c, **kw: fa.get_attr_patch_attn_head_k_all_pos_atpstar(model, c, case.corrupted, metric, **kw),
    }
    for name, call in calls.items():
        ref = call(case.clean)
        assert_varies(ref, name)
        assert_close(call(None, **src), ref)


def test_run_stats_count_what_a_clean_cache_skips_and_an_ablation_cannot():
    """``last_run_stats()``'s work on IOI-like pairs (equal before position 2), counted from the
    definition: a ``resid_pre`` cell is a no-op where the source's activation equals the corrupted
    run's at its position; the others recompute every prompt from that position, from their block."""
    case = _case("gpt2")
    model, metric = case.model, case.scalar
    batch, n_pos = case.corrupted.shape
    L = model.cfg.n_layers
    with torch.no_grad():
        _, corrupted = model.run_with_cache(case.corrupted)
    for kind, source in (("clean", case.clean_cache), ("zero", case.sources["zero"])):
        cells = [(layer, pos) for layer in range(L) for pos in range(n_pos)
                 if not torch.equal(source[f"blocks.{layer}.hook_resid_pre"][:, pos],
                                    corrupted[f"blocks.{layer}.hook_resid_pre"][:, pos])]
        assert len(cells) == (L * (n_pos - 2) if kind == "clean" else L * n_pos)
        fp.get_act_patch_resid_pre(model, case.corrupted, source, metric, backend="native", progress=False)
        stats = fastpatch.last_run_stats()
        assert stats["backend"] == "native" and stats["cells"] == L * n_pos
        assert (stats["no_op_cells"], stats["computed_cells"]) == (L * n_pos - len(cells), len(cells)), kind
        assert stats["row_positions"] == sum(batch * (n_pos - pos) for _, pos in cells)
        assert stats["row_position_blocks"] == sum(batch * (n_pos - pos) * (L - layer) for layer, pos in cells)
    # the hook backend runs every cell's whole forward
    fp.get_act_patch_resid_pre(model, case.corrupted, case.clean_cache, metric, backend="hooks", progress=False)
    stats = fastpatch.last_run_stats()
    assert (stats["no_op_cells"], stats["computed_cells"]) == (0, L * n_pos)
    assert (stats["row_positions"], stats["row_position_blocks"]) == (L * n_pos * batch * n_pos, L * n_pos * batch * n_pos * L)


def test_bad_sources_are_refused():
    case = _case("gpt2")
    model, metric, sources = case.model, case.scalar, case.sources
    with pytest.raises(ValueError, match="give clean_tokens or source=, not both"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, metric, source=sources["zero"])
    with pytest.raises(ValueError, match="clean_tokens is None"):
        fa.get_attr_patch_resid_pre(model, None, case.corrupted, metric)
    partial = zero_ablation(model, case.clean, names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(ValueError, match="source has no activation 'blocks.0.hook_resid_pre'"):
        fa.get_attr_patch_resid_pre(model, None, case.corrupted, metric, source=partial)
    longer = zero_ablation(model, torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="different sequence length"):
        fa.get_attr_patch_resid_pre(model, None, case.corrupted, metric, source=longer)
    with pytest.raises(ValueError, match="clean_cache.*different sequence length"):
        fp.get_act_patch_resid_pre(model, case.corrupted, longer, metric, progress=False)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        mean_ablation(model, case.clean, batch=0)
