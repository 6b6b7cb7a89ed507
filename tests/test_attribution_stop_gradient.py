"""Stop-gradient attribution variants and attribution at an intervened run (issue 15 item 5).

Reference, independent of fastpatch's zero probes: for a few cells of each sweep, the directional
derivative ``d metric / d alpha`` at 0 of a hooked corrupted forward in which

1. the intervention patches are applied first (TransformerLens's own setters on a copy of the
   activation, clean values from ``run_with_cache``),
2. the cell's activation is set to ``act + alpha * (setter(act, index, clean) - act)`` (the exact
   sweep's setter, so the slice is the exact sweep's slice), and
3. every stopped hook point returns ``x.detach()``

(hooks on one point run in that order). That derivative is the estimate's definition; fp32
reorderings only, so 1e-5 of the sweep's largest value. Each variant must also differ from plain
attribution (the stop-gradient reached the model's computation) and vary across cells.
"""

from __future__ import annotations

import pytest
import torch
import transformer_lens.utilities as tl_utils
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

import fastpatch
from fastpatch import attribution as fa
from fastpatch.attribution.passes import SWEEPS
from fastpatch.sources import zero_ablation

# GPT-NeoX's and LLaMA's bridges run HuggingFace's norm module; with hook_scale edited (detached)
# TransformerLens rebuilds the norm's output from the hooked scale and warns that it differs at rounding
pytestmark = pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")

SETTERS = {
    "resid_pre": tl.layer_pos_patch_setter,
    "mlp_out": tl.layer_pos_patch_setter,
    "attn_head_out_all_pos": tl.layer_head_vector_patch_setter,
    "attn_head_v_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_out_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_pattern_dest_src_pos": tl.layer_head_dest_src_pos_pattern_patch_setter,
}


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def case(request):
    return zoo.Case.build(request.param)


@pytest.fixture(scope="module")
def plain(case):
    return fa.attribute_nodes(case.model, case.clean, case.corrupted, case.scalar, list(SETTERS))


def _stop_points(model, frozen=(), not_mediated_by=()):
    """The reference's own list of stopped hook points."""
    points = list(not_mediated_by)
    if "pattern" in frozen:
        points += [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    if "ln_scale" in frozen:
        points += [n for n in model.hook_dict if n.endswith("hook_scale")]
    return points


def _cells(values, n=4):
    g = torch.Generator().manual_seed(5)
    flat = [int(values.abs().argmax()), values.numel() - 1, 0, int(torch.randint(values.numel(), (1,), generator=g))]
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(f), values.shape)) for f in dict.fromkeys(flat)][:n]


def _reference(case, sweep, index, stops=(), patches=(), source=None):
    """d metric / d alpha at 0, with ``patches`` ((hook name, setter, index, value)) applied first;
    the cell patched towards ``source``'s activation (default: the clean run's)."""
    model = case.model
    name = tl_utils.get_act_name(SWEEPS[sweep][0], index[0])
    clean = (case.clean_cache if source is None else source)[name]
    alpha = torch.zeros((), requires_grad=True)

    def patch(setter, idx, value):
        return lambda act, hook: setter(act.clone(), idx, value)

    def cell(act, hook):
        patched = SETTERS[sweep](act.detach().clone(), index, clean)
        return act + alpha * (patched - act.detach())

    hooks = [(n, patch(s, i, v)) for n, s, i, v in patches] + [(name, cell)]
    hooks += [(n, lambda act, hook: act.detach()) for n in stops]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        (grad,) = torch.autograd.grad(case.scalar(model(case.corrupted)), alpha, allow_unused=True)
    return 0.0 if grad is None else float(grad)  # None: every path from the cell is stopped


def _check(case, ours, sweeps, stops=(), patches=(), source=None):
    for sweep in sweeps:
        est = ours[sweep]
        assert_varies(est, sweep)
        scale = float(est.abs().max())
        for index in _cells(est):
            ref = _reference(case, sweep, index, stops, patches, source)
            assert abs(float(est[index]) - ref) <= 1e-5 * scale + 1e-7, (sweep, index, float(est[index]), ref)


def _differs(ours, plain, sweep):
    assert float((ours[sweep] - plain[sweep]).abs().max()) > 1e-3 * float(plain[sweep].abs().max()), sweep


VARIANTS = {
    "ln_scale": dict(frozen=("ln_scale",)),
    "pattern": dict(frozen="pattern"),
    "not_mediated_by": dict(not_mediated_by=["blocks.1.hook_attn_out", "blocks.0.hook_mlp_out"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stop_gradient_variant_equals_autograd_through_detached_hooks(case, plain, variant):
    kw = VARIANTS[variant]
    model = case.model
    sweeps = ["resid_pre", "attn_head_out_all_pos", "attn_head_v_by_pos"]
    if variant == "pattern":
        sweeps.append("attn_head_pattern_dest_src_pos")
    if variant == "ln_scale":
        sweeps.append("mlp_out")
    ours = fa.attribute_nodes_variant(model, case.clean, case.corrupted, case.scalar, sweeps, **kw)
    assert fastpatch.hook_count(model) == 0
    for sweep in sweeps:
        assert ours[sweep].shape == plain[sweep].shape
    stops = _stop_points(model, **{k: ([v] if isinstance(v, str) else v) for k, v in kw.items()})
    checked = [s for s in sweeps if s != "attn_head_pattern_dest_src_pos"]
    _differs(ours, plain, "resid_pre")
    _differs(ours, plain, "attn_head_out_all_pos" if variant != "not_mediated_by" else "attn_head_v_by_pos")
    if variant == "pattern":
        # a node at a stopped point has all its effect through it; queries and keys act only via patterns
        assert torch.count_nonzero(ours["attn_head_pattern_dest_src_pos"]) == 0
        qk = fa.attribute_nodes_variant(
            model, case.clean, case.corrupted, case.scalar, ["attn_head_q_all_pos", "attn_head_k_all_pos"], **kw
        )
        assert all(torch.count_nonzero(v) == 0 for v in qk.values())
    if variant == "not_mediated_by":
        # every head of layer 1 writes only through blocks.1.hook_attn_out; layer-0 heads keep their other paths
        assert torch.count_nonzero(ours["attn_head_out_all_pos"][1]) == 0
        assert torch.count_nonzero(ours["attn_head_out_all_pos"][0]) > 0
    _check(case, ours, checked, stops)


def test_intervened_run_equals_autograd_on_the_patched_forward(case, plain):
    model = case.model
    sweeps = ["resid_pre", "attn_head_out_all_pos", "attn_head_v_by_pos"]
    # a head everywhere, one residual position, and one MLP neuron through a setter of one's own
    def neuron(act, index, clean):
        act[:, index[1], index[2]] = clean[:, index[1], index[2]]
        return act

    patches = [("z", (0, 1)), ("resid_pre", (2, 3)), ("post", (1, 4, 7), neuron)]
    ours = fa.attribute_nodes_variant(model, case.clean, case.corrupted, case.scalar, sweeps, patches=patches)
    assert fastpatch.hook_count(model) == 0
    cache = case.clean_cache
    ref_patches = [
        ("blocks.0.attn.hook_z", tl.layer_head_vector_patch_setter, (0, 1), cache["blocks.0.attn.hook_z"]),
        ("blocks.2.hook_resid_pre", tl.layer_pos_patch_setter, (2, 3), cache["blocks.2.hook_resid_pre"]),
        ("blocks.1.mlp.hook_post", neuron, (1, 4, 7), cache["blocks.1.mlp.hook_post"]),
    ]
    _differs(ours, plain, "resid_pre")
    # the patched slices are the clean run's now: nothing left to patch there
    assert float(ours["attn_head_out_all_pos"][0, 1]) == 0.0 and float(ours["resid_pre"][2, 3]) == 0.0
    _check(case, ours, sweeps, patches=ref_patches)

    # patched with an ablation instead, and stop-gradients on top (one forward for both)
    zero = zero_ablation(model, case.corrupted)
    ours = fa.attribute_nodes_variant(
        model, case.clean, case.corrupted, case.scalar, ["resid_pre", "attn_head_out_all_pos"],
        patches=[("z", (0, 1))], patch_source=zero, frozen="ln_scale",
    )
    ref_patches = [("blocks.0.attn.hook_z", tl.layer_head_vector_patch_setter, (0, 1), zero["blocks.0.attn.hook_z"])]
    _check(case, ours, ["resid_pre", "attn_head_out_all_pos"], _stop_points(model, frozen=["ln_scale"]), ref_patches)


def test_variant_with_an_ablation_source_equals_autograd(case, plain):
    """``source=``: every cell patched towards the mean ablation, the intervention patches too (no
    ``patch_source``), under a stop-gradient."""
    model = case.model
    mean = zoo.ablation_source(case, "mean")
    sweeps = ["resid_pre", "attn_head_out_all_pos"]
    kw = dict(frozen="pattern", patches=[("z", (0, 1))])
    ours = fa.attribute_nodes_variant(model, None, case.corrupted, case.scalar, sweeps, source=mean, **kw)
    assert fastpatch.hook_count(model) == 0
    ref_patches = [("blocks.0.attn.hook_z", tl.layer_head_vector_patch_setter, (0, 1), mean["blocks.0.attn.hook_z"])]
    _check(case, ours, sweeps, _stop_points(model, frozen=["pattern"]), ref_patches, source=mean)
    assert float(ours["attn_head_out_all_pos"][0, 1]) == 0.0  # patched to the source's value already


def test_no_variant_is_plain_attribution_and_single_sweep_form(case, plain):
    model = case.model
    ours = fa.attribute_nodes_variant(model, case.clean, case.corrupted, case.scalar, list(SETTERS))
    for sweep in SETTERS:
        assert torch.equal(ours[sweep], plain[sweep]), sweep
    one = fa.get_attr_patch_variant(
        model, case.clean, case.corrupted, case.per_example, "attn_head_out_all_pos", frozen="pattern", reduce="none"
    )
    both = fa.attribute_nodes_variant(
        model, case.clean, case.corrupted, case.scalar, ["attn_head_out_all_pos"], frozen="pattern"
    )["attn_head_out_all_pos"]
    assert one.shape == both.shape + (case.clean.shape[0],)
    assert_close(one.mean(-1), both)  # per-prompt estimates of a batch-mean metric, averaged
    # noising: the clean run is the one patched (and intervened on), as with the token arguments swapped
    kw = dict(frozen="pattern", patches=[("z", (0, 1))])
    noising = fa.attribute_nodes_variant(model, case.clean, case.corrupted, case.scalar, ["resid_pre"], direction="noising", **kw)
    swapped = fa.attribute_nodes_variant(model, case.corrupted, case.clean, case.scalar, ["resid_pre"], **kw)
    assert torch.equal(noising["resid_pre"], swapped["resid_pre"])
    assert_varies(noising["resid_pre"])


def test_bad_input_is_refused_and_leaves_no_hook(case):
    if case.name != "gpt2":
        pytest.skip("argument checks do not depend on the architecture")
    model = case.model
    flags = fastpatch.model_flags(model)
    run = lambda **kw: fa.attribute_nodes_variant(model, case.clean, case.corrupted, case.scalar, ["resid_pre"], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="unknown frozen component 'mlp'"):
        run(frozen=["mlp"])
    with pytest.raises(ValueError, match="no hook point 'blocks.9.hook_attn_out'"):
        run(not_mediated_by=["blocks.9.hook_attn_out"])
    with pytest.raises(ValueError, match="not_mediated_by must be a name or a list"):
        run(not_mediated_by=[3])
    with pytest.raises(ValueError, match="patches: no TransformerLens setter"):
        run(patches=[("z", (0,))])
    with pytest.raises(ValueError, match="patches"):
        run(patches=[("z", (0, 99))])
    with pytest.raises(ValueError, match="patch_source has no activation"):
        run(patches=[("z", (0, 1))], patch_source={})
    with pytest.raises(ValueError, match="patch_source must be an activation cache"):
        run(patches=[("z", (0, 1))], patch_source=[1])

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        fa.attribute_nodes_variant(
            model, case.clean, case.corrupted, broken, ["resid_pre"], frozen="pattern", patches=[("z", (0, 1))]
        )
    assert fastpatch.hook_count(model) == 0
    assert fastpatch.model_flags(model) == flags
