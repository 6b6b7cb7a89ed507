"""Metrics that read internal activations (issue 15, item 1), and TransformerLens drop-in gaps (item 8).

A metric that reads an activation through a hook the caller put on the model gave silently wrong
numbers (issue 15: a batched forward calls the hook on many cells' rows at once, the native
backend not at all). Such a model is now refused on every entry point, or, with
``user_hooks="per_cell"``, each cell's forward runs alone with the hook and the values are
TransformerLens's.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl
from transformer_lens.utilities import get_act_name

import fastpatch
from fastpatch import attribution as fa
from fastpatch import patching as fp
from fastpatch.metrics import ActivationMetric, AttentionTo, HeadDLA, LogitDiff, NeuronValue, NormalizedEffect

ZOO_MODELS = ("gpt2", "neox", "llama")


@pytest.fixture(scope="module", params=ZOO_MODELS)
def hooked_case(request):
    """A zoo model with a caller's hook on the last block's attention pattern, and a metric reading it."""
    case = zoo.Case.build(request.param)
    seen = {}

    def keep_pattern(pattern, hook):
        seen["pattern"] = pattern.detach()

    point = case.model.blocks[-1].attn.hook_pattern
    point.add_hook(keep_pattern)

    def attention_metric(logits):  # head 0's attention from the last position to position 1, plus the logits' metric
        return seen["pattern"][:, 0, -1, 1].mean() + 0.01 * case.scalar(logits)

    case.attention_metric = attention_metric
    case.hook_name = point.name
    yield case
    case.model.reset_hooks(including_permanent=True)


def test_a_metric_reading_a_users_hook_is_refused_on_every_entry_point(hooked_case):
    case = hooked_case
    model, args = case.model, (case.corrupted, case.clean_cache, case.attention_metric)
    name = f"hooks of its own at {case.hook_name}"
    for backend in ("auto", "native", "hooks"):
        with pytest.raises(ValueError, match=name):
            fp.get_act_patch_attn_head_out_all_pos(model, *args, backend=backend, progress=False)
    with pytest.raises(ValueError, match=name):
        fp.get_act_patch_block_every(model, *args, progress=False)
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(case.corrupted)
    with pytest.raises(ValueError, match=name):
        fp.get_act_patch_direct_path(model, case.corrupted, case.clean_cache, corrupted_cache, case.attention_metric,
                                     0, 0, "q", verbose=False)
    with pytest.raises(ValueError, match=name):
        fa.get_attr_patch_attn_head_out_all_pos(model, case.clean, case.corrupted, case.attention_metric)
    with pytest.raises(ValueError, match="runs on the hook backend"):
        fp.get_act_patch_attn_head_out_all_pos(model, *args, backend="native", user_hooks="per_cell", progress=False)
    with pytest.raises(ValueError, match="user_hooks must be one of"):
        fp.get_act_patch_attn_head_out_all_pos(model, *args, user_hooks="batched", progress=False)
    assert fastpatch.hook_count(model) == 1  # the caller's hook is still there, nothing else


def test_per_cell_user_hooks_give_transformer_lens_numbers(hooked_case):
    case = hooked_case
    model, args = case.model, (case.corrupted, case.clean_cache, case.attention_metric)
    # four head cells (each a forward of its own on both sides), from three layers
    cells = pd.DataFrame({"layer": [0, 1, 1, 2], "head": [0, 0, 2, 1]})
    sweep = dict(patch_setter=tl.layer_head_vector_patch_setter, activation_name="z", index_df=cells)
    ref = tl.generic_activation_patch(model, *args, **sweep)
    assert_varies(ref)
    ours = fp.generic_activation_patch(model, *args, **sweep, user_hooks="per_cell", progress=False, chunk_size=64)
    assert_close(ours, ref)
    assert fastpatch.last_run_stats()["backend"] == "hooks"
    if case.name != "gpt2":  # one direct path suffices: the per-cell route is the same for every plan
        return
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(case.corrupted)
    path_args = (model, case.corrupted, case.clean_cache, corrupted_cache, case.attention_metric, 0, 0, "q")
    ref = tl.get_act_patch_direct_path(*path_args, verbose=False)
    assert_varies(ref[1:])
    assert_close(fp.get_act_patch_direct_path(*path_args, verbose=False, user_hooks="per_cell"), ref)
    assert fastpatch.hook_count(model) == 1


# ---- ActivationMetric and the stock ones ---------------------------------------------------------
@pytest.fixture(scope="module", params=ZOO_MODELS)
def case(request):
    return zoo.Case.build(request.param)


def _activation_metrics(case):
    model, cfg = case.model, case.model.cfg
    answer, wrong = case.clean[:, -1], case.corrupted[:, -1]
    last = cfg.n_layers - 1
    resid = f"blocks.{last - 1}.hook_resid_post"
    return {
        "attention": AttentionTo(last, 0, 4, 1, per_prompt=True),
        "attention_mid": AttentionTo(last, 1, 3, 2, per_prompt=True),  # with LogitDiff: the last block at 3..4
        "neuron": NeuronValue(last, 5, per_prompt=True),
        "dla": HeadDLA(model, last, 1, answer, wrong, per_prompt=True),
        "custom": ActivationMetric(  # an activation and the logits together
            [resid, f"blocks.{last}.attn.hook_pattern"],
            lambda logits, acts: acts[resid][:, -1, :4].sum(-1) + logits[:, -1].log_softmax(-1)[:, 0],
            per_prompt=True,
        ),
        "logit_diff": LogitDiff(answer, wrong, per_prompt=True),  # a logit metric beside them
        "normalized": NormalizedEffect(NeuronValue(last, 5, per_prompt=True), 2.0, torch.tensor([0.5, -1.0, 0.0])),
        "stream": ActivationMetric(  # the residual stream, block outputs and the final norm's input
            ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", f"blocks.{last}.hook_attn_out",
             f"blocks.{last}.hook_mlp_out", f"blocks.{last - 1}.hook_resid_post", "ln_final.hook_in"],
            lambda logits, acts: (acts["blocks.1.hook_resid_pre"][:, -1, 0] + acts["blocks.1.attn.hook_z"][:, -1, 0, 1]
                                  + acts[f"blocks.{last}.hook_attn_out"][:, -1, 2] + acts[f"blocks.{last}.hook_mlp_out"][:, -2, 3]
                                  + acts[f"blocks.{last - 1}.hook_resid_post"][:, -1, 4] + acts["ln_final.hook_in"][:, -1, 5]),
            per_prompt=True,
        ),
    }


def _value(metric, logits, acts):
    """One run's value, as the engine computes it (a metric declaring reads_logits=False is given None)."""
    if not hasattr(metric, "from_activations"):
        return metric(logits)
    return metric.from_activations(logits if getattr(metric, "reads_logits", True) else None, acts)


def _tl_loop(case, metrics, activation_name, setter, cells):
    """TransformerLens's loop: one forward per cell, its patch hook then caching hooks for the metrics."""
    model, out = case.model, []
    reads = list(dict.fromkeys(n for m in metrics.values() for n in getattr(m, "activation_reads", ())))
    for index in cells.to_numpy().tolist():
        name = get_act_name(activation_name, index[0])
        acts = {}
        hooks = [(name, lambda act, hook, index=index, name=name: setter(act.clone(), index, case.clean_cache[name]))]
        hooks += [(n, lambda act, hook, n=n: acts.__setitem__(n, act.detach())) for n in reads]
        with torch.no_grad():
            logits = model.run_with_hooks(case.corrupted, fwd_hooks=hooks)
        out.append(torch.stack([_value(m, logits, acts) for m in metrics.values()]))
    return torch.stack(out, dim=1)  # [n_metrics, n_cells, batch]


def _assert_close_per_metric(ours, ref):
    """Each metric against its own scale (their scales differ by orders of magnitude)."""
    for i in range(ref.shape[0]):
        assert_close(ours[i], ref[i])


def test_activation_metrics_equal_a_transformer_lens_loop_with_caching_hooks(case):
    """On both backends; the default one is the native backend, inside the patched layers too (the head
    sweep patches z in the layer AttentionTo, HeadDLA and NeuronValue read)."""
    metrics = _activation_metrics(case)
    model, args = case.model, (case.model, case.corrupted, case.clean_cache, metrics)
    heads = pd.DataFrame({"layer": [0, 1, 1, 2], "head": [0, 0, 2, 1]})
    resid = pd.DataFrame({"layer": [0, 1, 2], "pos": [3, 2, 4]})  # patches of the very activations some metrics read
    for activation_name, setter, cells in (("z", tl.layer_head_vector_patch_setter, heads),
                                           ("resid_pre", tl.layer_pos_patch_setter, resid)):
        ref = _tl_loop(case, metrics, activation_name, setter, cells)
        for i, name in enumerate(metrics):
            assert_varies(ref[i], f"{case.name} {activation_name} {name}")
        for backend in ("auto", "hooks"):
            ours = fp.generic_activation_patch(*args, setter, activation_name, index_df=cells, reduce="none",
                                               baseline=True, progress=False, chunk_size=2, backend=backend)
            assert fastpatch.last_run_stats()["backend"] == ("native" if backend == "auto" else "hooks")
            _assert_close_per_metric(ours.values, ref)
        # no metric reading full logits or undeclared positions: the native backend unembeds only LogitDiff's two
        # columns, and computes the last block at the positions the metrics declare
        kept = ("attention", "attention_mid", "neuron", "dla", "logit_diff", "normalized")
        declared = [i for i, name in enumerate(metrics) if name in kept]
        only = fp.generic_activation_patch(model, case.corrupted, case.clean_cache, {n: metrics[n] for n in metrics
                                           if n in kept}, setter, activation_name,
                                           index_df=cells, reduce="none", progress=False, chunk_size=3).values
        assert fastpatch.last_run_stats()["backend"] == "native"
        _assert_close_per_metric(only, ref[declared])
    with torch.no_grad():
        logits, cache = model.run_with_cache(case.corrupted)
    _assert_close_per_metric(ours.baseline, torch.stack([_value(m, logits, cache) for m in metrics.values()]))
    # a metric reading the last block where it declared it would not gets NaN there, never a plausible number
    post = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    liar = ActivationMetric([post], lambda logits, acts: acts[post][:, -1, 0], per_prompt=True, reads_logits=False,
                            positions=[3])
    lied = fp.generic_activation_patch(*args[:3], liar, tl.layer_pos_patch_setter, "resid_pre", index_df=resid,
                                       reduce="none", progress=False).values
    assert fastpatch.last_run_stats()["backend"] == "native"
    assert torch.isnan(lied[:2]).all()  # the cells changing position 3 (the last one's patch starts at 4: all computed)
    unrecorded = ActivationMetric(["blocks.1.attn.hook_q"], lambda logits, acts: acts["blocks.1.attn.hook_q"].sum())
    with pytest.raises(ValueError, match="does not record"):
        fp.generic_activation_patch(*args[:3], unrecorded, tl.layer_pos_patch_setter, "resid_pre", index_df=resid,
                                    progress=False, backend="native")
    assert fastpatch.hook_count(model) == 0


def _every_hook_metrics(case):
    """One metric per kind of hook the native backend records, reading it in every layer through a fixed
    random projection (positions the prompts share are left out: they never change), so that a wrong value in
    any layer, upstream or downstream of a patch, shows."""
    model, cache = case.model, case.clean_cache
    kinds = ["hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out",
             "hook_resid_post"] + ([] if model.cfg.parallel_attn_mlp else ["hook_resid_mid"])
    g = torch.Generator().manual_seed(0)
    metrics = {}
    for kind in kinds + ["ln_final.hook_in"]:
        names = [f"blocks.{layer}.{kind}" for layer in range(model.cfg.n_layers)] if kind != "ln_final.hook_in" else [kind]
        weights = {n: torch.randn(cache[n].shape[1:], generator=g) for n in names}
        for n, w in weights.items():  # [pos, ...], or the pattern's [head, dest, src]: shared prompt prefix off
            (w[:, :2] if "pattern" in n else w[:2]).zero_()

        def fn(logits, acts, weights=weights):
            assert logits is None  # reads_logits=False: no backend computes them for this metric
            return sum((acts[n] * w).flatten(1).sum(1) for n, w in weights.items())

        metrics[kind] = ActivationMetric(names, fn, per_prompt=True, reads_logits=False)
    return metrics


def test_native_records_every_hook_inside_patched_layers(case):
    """Every patch kind the native backend starts inside a layer (head z, pattern, k; attention and MLP outputs;
    resid_mid), one cell per layer, with metrics reading each recorded hook in every layer: equal to the
    TransformerLens loop with caching hooks, natively."""
    model = case.model
    metrics = _every_hook_metrics(case)
    heads = pd.DataFrame({"layer": [0, 1, 2], "head": [1, 0, 1]})  # head 1 < n_kv_heads: k patches on LLaMA's GQA too
    positions = pd.DataFrame({"layer": [0, 1, 2], "pos": [2, 4, 3]})
    sweeps = [("z", tl.layer_head_vector_patch_setter, heads), ("pattern", tl.layer_head_pattern_patch_setter, heads),
              ("k", tl.layer_head_vector_patch_setter, heads), ("attn_out", tl.layer_pos_patch_setter, positions),
              ("mlp_out", tl.layer_pos_patch_setter, positions)]
    if not model.cfg.parallel_attn_mlp:
        sweeps.append(("resid_mid", tl.layer_pos_patch_setter, positions))
    for activation_name, setter, cells in sweeps:
        ref = _tl_loop(case, metrics, activation_name, setter, cells)
        for i, name in enumerate(metrics):
            assert_varies(ref[i] - ref[i, :1], f"{case.name} {activation_name} {name} across cells")
        ours = fp.generic_activation_patch(model, case.corrupted, case.clean_cache, metrics, setter, activation_name,
                                           index_df=cells, reduce="none", progress=False, backend="native", chunk_size=2).values
        assert fastpatch.last_run_stats()["backend"] == "native"
        _assert_close_per_metric(ours, ref)
    assert fastpatch.hook_count(model) == 0


def test_head_dla_equals_transformer_lens_cache_decomposition(case):
    """HeadDLA against TransformerLens's own stack_head_results + apply_ln_to_stack on the same run."""
    model, cfg = case.model, case.model.cfg
    answer, wrong = case.clean[:, -1], case.corrupted[:, -1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(case.corrupted)
        stack = cache.apply_ln_to_stack(cache.stack_head_results(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1)
        direction = (model.W_U[:, answer] - model.W_U[:, wrong]).T * model.ln_final.w
        ref = (stack * direction).sum(-1)  # [layer * head, batch]
    ours = torch.stack([HeadDLA(model, layer, head, answer, wrong, per_prompt=True).from_activations(logits, cache)
                        for layer in range(cfg.n_layers) for head in range(cfg.n_heads)])
    assert_close(ours, ref)
    assert_varies(ref)


def test_activation_metric_refusals(case):
    model = case.model
    metric = NeuronValue(1, 3)
    with pytest.raises(ValueError, match="pass it to fastpatch.patching"):
        metric(torch.zeros(3, 5, 7))
    with pytest.raises(ValueError, match="which acts does not hold"):
        metric.from_activations(torch.zeros(3, 5, 7), {})
    with pytest.raises(ValueError, match="hook_names must be"):
        ActivationMetric([], lambda logits, acts: logits.sum())
    with pytest.raises(ValueError, match="out of range"):
        HeadDLA(model, model.cfg.n_layers, 0, case.clean[:, -1])
    args = (model, case.corrupted, case.clean_cache)
    bogus = ActivationMetric(["blocks.0.hook_nothing"], lambda logits, acts: logits.sum())
    with pytest.raises(ValueError, match="not hook points of this model"):
        fp.get_act_patch_resid_pre(*args, bogus, progress=False)
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(case.corrupted)
    with pytest.raises(ValueError, match="not supported for this kind of plan"):
        fp.get_act_patch_direct_path(*args[:3], corrupted_cache, metric, 0, 0, "q", verbose=False)
    assert fastpatch.hook_count(model) == 0


def test_attribution_takes_activation_metrics(case):
    """Node attribution with activation metrics against autograd through a hooked forward written here."""
    model, cfg = case.model, case.model.cfg
    last = cfg.n_layers - 1
    dla = HeadDLA(model, last, 1, case.clean[:, -1], case.corrupted[:, -1])
    attention = AttentionTo(last, 0, 4, 1)
    both = ActivationMetric(dla.activation_reads + attention.activation_reads,
                            lambda logits, acts: dla.fn(logits, acts) + attention.fn(logits, acts))
    names = [get_act_name("resid_pre", layer) for layer in range(cfg.n_layers)]
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(case.corrupted)
    for metric in (dla, both):
        probes, acts = {}, {}
        hooks = [(n, lambda act, hook, n=n: act + probes.setdefault(n, torch.zeros_like(act, requires_grad=True)))
                 for n in names]
        hooks += [(n, lambda act, hook, n=n: acts.__setitem__(n, act)) for n in metric.activation_reads]
        with torch.enable_grad():
            value = metric.from_activations(model.run_with_hooks(case.corrupted, fwd_hooks=hooks), acts)
            grads = torch.autograd.grad(value, [probes[n] for n in names])
        ref = torch.stack([((case.clean_cache[n] - corrupted_cache[n]) * g).sum((0, -1)) for n, g in zip(names, grads)])
        assert_varies(ref)
        assert_close(fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, metric), ref)
    assert fastpatch.hook_count(model) == 0


# ---- drop-in gaps (issue 15, item 8) -----------------------------------------------------------
def test_transformer_lens_type_aliases_are_reexported():
    for name in ("Logits", "CorruptedActivation", "PatchedActivation", "AxisNames", "Reduce"):
        assert getattr(fp, name) is getattr(tl, name), name
        assert name in fp.__all__, name
    assert "MetricFn" in fp.__all__


def test_every_transformer_lens_setter_is_batched_with_its_values():
    """Enumerated from TransformerLens's module, so a setter added there fails here until it is batched."""
    from fastpatch.engine.setters import apply_batched, setter_axes

    setters = {name: obj for name, obj in vars(tl).items() if name.endswith("_patch_setter") and callable(obj)}
    assert len(setters) >= 6
    g = torch.Generator().manual_seed(0)
    batch, n_cells = 2, 5
    for name, setter in setters.items():
        axes = setter_axes(setter)
        assert axes is not None, f"{name} is not recognised by fastpatch.engine.setters"
        assert getattr(fp, name) is setter
        # head-vector activations [batch, pos, head, d_head]; pattern-shaped ones [batch, head, dest, src]
        shape = (batch, 3, 6, 6) if "pattern" in name else (batch, 6, 3, 4)
        clean, corrupted = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        indices = torch.stack([torch.randint(0, shape[a], (n_cells,), generator=g) for a in axes], dim=1)
        ours = corrupted.repeat(n_cells, *([1] * (len(shape) - 1)))
        apply_batched(ours.view(n_cells, *shape), axes, torch.arange(n_cells), indices, clean)
        for c in range(n_cells):
            expected = setter(corrupted.clone(), [0] + indices[c].tolist(), clean)
            assert torch.equal(ours[c * batch : (c + 1) * batch], expected), (name, indices[c].tolist())
            assert not torch.equal(expected, corrupted), name  # the patch changed something


@pytest.mark.slow  # building the Mixtral-shaped zoo model takes seconds
def test_a_neuron_of_a_mixture_of_experts_runs_on_the_hook_backend():
    """A mixture of experts has no single mlp.hook_post the native forward computes: refused natively, with why."""
    model = zoo.ARCH_ZOO["mixtral"]()
    clean, corrupted = (t % model.cfg.d_vocab for t in zoo.prompt_pair(2, 5, 2))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    with pytest.raises(ValueError, match="mlp.hook_post, which a mixture of experts"):
        fp.get_act_patch_resid_pre(model, corrupted, clean_cache, NeuronValue(1, 3), progress=False, backend="native")
    with pytest.warns(UserWarning, match="mixture of experts"):
        fp.get_act_patch_resid_pre(model, corrupted, clean_cache, NeuronValue(1, 3), progress=False)
    assert fastpatch.last_run_stats()["backend"] == "hooks"
