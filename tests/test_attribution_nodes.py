"""Node attribution patching (fastpatch.attribution) on every zoo architecture.

What is checked, and against what:

1. The estimator itself. For a few cells of every sweep, the first-order estimate is recomputed
   independently: a forward hook on the corrupted run sets the activation to
   ``act + alpha * (setter(act, index, clean) - act)``, where ``setter`` is TransformerLens's own
   patch setter for that sweep (so the slice is by construction the exact sweep's slice), and
   ``d metric / d alpha`` at ``alpha = 0`` is taken with ``torch.autograd``. That directional
   derivative *is* the definition of the estimate; it differs from ours only in float32 summation
   order (a masked ``[batch, pos, d]`` sum versus a per-cell sum), so the tolerance is 1e-5
   relative to the sweep's largest value (float32 eps ~1.2e-7, times a few hundred summands).
   A second, gradient-free check uses central finite differences of the *patched metric* on a
   float64 copy of each model, ``(m(+eps) - m(-eps)) / (2 eps)`` with ``eps = 1e-4``: truncation
   error is O(eps^2) ~ 1e-8 and float64 rounding ~1e-16 / eps ~ 1e-12, so 1e-6 relative holds
   (LLaMA keeps float32 norms/softmax inside a float64 model: looser there, see the test).
2. TransformerLens's ``attribution_patch`` node scores (node granularity, batch mean), where
   the definitions coincide (see :func:`test_node_scores_match_transformer_lens`).
3. Linearity identities that hold exactly for a first-order estimate.
4. Shapes, variation across cells, the ``*_every`` stacking, ``reduce``, and hygiene
   (no hooks left, training mode refused, one forward per run and one backward).
"""

from __future__ import annotations

import pytest
import torch
import transformer_lens.utilities as tl_utils
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

import fastpatch
from fastpatch import attribution as fa
from fastpatch.attribution.nodes import SWEEPS

ALL_SWEEPS = sorted(SWEEPS)


def _neuron_setter(corrupted_activation, index, clean_activation):
    """Patch one MLP neuron at one position: ``index = (layer, pos, neuron)`` on ``[batch, pos, d_mlp]``."""
    _, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


# sweep -> TransformerLens patch setter of the matching exact sweep (index includes the layer).
SETTERS = {
    "resid_pre": tl.layer_pos_patch_setter,
    "resid_mid": tl.layer_pos_patch_setter,
    "attn_out": tl.layer_pos_patch_setter,
    "mlp_out": tl.layer_pos_patch_setter,
    "attn_head_out_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_q_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_k_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_v_by_pos": tl.layer_pos_head_vector_patch_setter,
    "attn_head_pattern_by_pos": tl.layer_head_pos_pattern_patch_setter,
    "attn_head_pattern_dest_src_pos": tl.layer_head_dest_src_pos_pattern_patch_setter,
    "attn_head_out_all_pos": tl.layer_head_vector_patch_setter,
    "attn_head_q_all_pos": tl.layer_head_vector_patch_setter,
    "attn_head_k_all_pos": tl.layer_head_vector_patch_setter,
    "attn_head_v_all_pos": tl.layer_head_vector_patch_setter,
    "attn_head_pattern_all_pos": tl.layer_head_pattern_patch_setter,
    "mlp_neuron_by_pos": _neuron_setter,
}


def _has(case, sweep):
    return tl_utils.get_act_name(SWEEPS[sweep][0], 0) in case.model.hook_dict


def _sweeps(case):
    return [s for s in ALL_SWEEPS if _has(case, s)]


@pytest.fixture(scope="module")
def attr(zoo_case):
    """Every sweep the model has, scalar metric, from one pass (compared against many things)."""
    case = zoo_case
    return fa.attribute_nodes(case.model, case.clean, case.corrupted, case.scalar)


def _cells(values: torch.Tensor, n: int = 4):
    """A few cells: the largest |value|, the last cell, the first cell and a fixed pseudo-random one."""
    g = torch.Generator().manual_seed(3)
    flat = [int(values.abs().argmax()), values.numel() - 1, 0, int(torch.randint(values.numel(), (1,), generator=g))]
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(f), values.shape)) for f in dict.fromkeys(flat)][:n]


def _directional(model, clean_tokens, corrupted_tokens, metric, sweep, index, clean_act):
    """d metric / d alpha at 0 of the corrupted run with ``act += alpha * (patched - act)`` at one cell."""
    name = tl_utils.get_act_name(SWEEPS[sweep][0], index[0])
    alpha = torch.zeros((), dtype=clean_act.dtype, requires_grad=True)

    def hook(act, hook):
        patched = SETTERS[sweep](act.detach().clone(), index, clean_act)
        return act + alpha * (patched - act.detach())

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        value = metric(model(corrupted_tokens))
        (grad,) = torch.autograd.grad(value, alpha)
    return float(grad)


def _clean_act(model, tokens, name):
    store = {}

    def hook(act, hook):
        store["act"] = act.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        model(tokens)
    return store["act"]


# ---- 1. the estimator ---------------------------------------------------------------------------
@pytest.mark.parametrize("sweep", ALL_SWEEPS)
def test_estimate_equals_directional_derivative_of_the_exact_patch(zoo_case, attr, sweep):
    case = zoo_case
    if not _has(case, sweep):
        pytest.skip("parallel attention+MLP blocks have no resid_mid")
    ours = attr[sweep]
    assert_varies(ours, sweep)
    scale = float(ours.abs().max())
    for index in _cells(ours):
        name = tl_utils.get_act_name(SWEEPS[sweep][0], index[0])
        clean_act = case.clean_cache[name]  # run_with_cache on the clean tokens
        ref = _directional(case.model, case.clean, case.corrupted, case.scalar, sweep, index, clean_act)
        assert abs(float(ours[index]) - ref) <= 1e-5 * scale + 1e-7, (sweep, index, float(ours[index]), ref)


@pytest.fixture(scope="module")
def f64(zoo_case):
    """A float64 copy of the model and its attribution for every sweep."""
    case = zoo_case
    model = zoo.ZOO[case.name]().to(torch.float64).eval()  # the same seed-0 weights, in float64
    for a, b in zip(model.parameters(), case.model.parameters()):
        assert torch.equal(a.float(), b), "the float64 copy must have the fp32 model's weights"
    return model, fa.attribute_nodes(model, case.clean, case.corrupted, case.scalar)


@pytest.mark.parametrize(
    "sweep",
    ["resid_pre", "attn_head_out_by_pos", "attn_head_k_all_pos", "attn_head_pattern_dest_src_pos", "mlp_neuron_by_pos", "mlp_out"],
)
def test_estimate_equals_finite_difference_in_float64(zoo_case, f64, sweep):
    case = zoo_case
    model, ours_all = f64
    ours = ours_all[sweep]
    assert ours.dtype == torch.float64
    scale = float(ours.abs().max())
    # HF's LLaMA computes RMSNorm and the attention softmax in float32 even in a float64 model,
    # so its patched metric carries float32 rounding (~1e-7 relative): there a larger step
    # (truncation O(eps^2) ~ 1e-5) and a 5e-4 relative tolerance (rounding ~1e-7 * |metric| / eps).
    fp32_inside = case.name == "llama"
    eps, rtol = (3e-3, 5e-4) if fp32_inside else (1e-4, 1e-6)
    for index in _cells(ours, n=2):
        name = tl_utils.get_act_name(SWEEPS[sweep][0], index[0])
        clean_act = _clean_act(model, case.clean, name)

        def run(step):
            def hook(act, hook):
                patched = SETTERS[sweep](act.clone(), index, clean_act)
                return act + step * (patched - act)

            with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
                return float(case.scalar(model(case.corrupted)))

        ref = (run(eps) - run(-eps)) / (2 * eps)
        assert abs(float(ours[index]) - ref) <= rtol * scale + 1e-9, (sweep, index, float(ours[index]), ref)


# ---- 2. TransformerLens's attribution_patch ---------------------------------------------------------
def test_node_scores_match_transformer_lens(zoo_case, attr):
    """TransformerLens node scores == ours where the node definitions coincide.

    TransformerLens scores ``(a_clean - a_corrupt) . grad`` at ``Node.hook_name``, per example,
    then averages over the batch:

    - ``attn_head_out`` (layer, head, position) reads ``blocks.{l}.attn.hook_z`` (the head's z,
      *not* its residual write ``hook_result``), contracted over ``d_head`` at one position and
      head: exactly our ``get_attr_patch_attn_head_out_by_pos[layer, position, head]``.
    - ``mlp_out`` (layer, position) reads ``blocks.{l}.hook_mlp_out``: our ``get_attr_patch_mlp_out``.
    - ``embed`` (position) reads ``hook_embed``, the token embedding. It enters the residual
      stream additively (``resid_pre_0 = embed + pos_embed`` with learned positions, ``= embed``
      with rotary ones), clean and corrupted prompts share positions (the position-embedding delta
      is 0), and the gradients at ``hook_embed`` and ``resid_pre_0`` are equal; so it coincides
      with our ``get_attr_patch_resid_pre[0, position]``.

    The metric must mean the same to both: TransformerLens hands ``metric_fn`` one example's
    logits, so it reads fixed token ids (not a per-prompt answer) and averages over the batch;
    the gradient of a batch mean summed over prompts equals TransformerLens's mean of
    per-example scores. float32 with different batching: 1e-5 of the largest score.
    """
    case = zoo_case
    model = case.model

    def metric(logits):
        return (logits[:, -1, 7] - logits[:, -1, 11]).mean()

    ours = fa.attribute_nodes(model, case.clean, case.corrupted, metric, ["attn_head_out_by_pos", "mlp_out", "resid_pre"])
    ref = attribution_patch(model, case.clean, case.corrupted, metric, EdgeAttributionConfig(granularity="node")).node_scores
    assert fastpatch.hook_count(model) == 0
    z, mlp, resid = ours["attn_head_out_by_pos"], ours["mlp_out"], ours["resid_pre"]
    theirs_z, theirs_mlp, theirs_embed = torch.zeros_like(z), torch.zeros_like(mlp), torch.zeros_like(resid[0])
    seen = {"attn_head_out": 0, "mlp_out": 0, "embed": 0}
    for node, score in ref.items():
        seen[node.kind] += 1
        if node.kind == "attn_head_out":
            theirs_z[node.layer, node.position, node.head] = score
        elif node.kind == "mlp_out":
            theirs_mlp[node.layer, node.position] = score
        else:
            theirs_embed[node.position] = score
    assert seen == {"attn_head_out": z.numel(), "mlp_out": mlp.numel(), "embed": resid.shape[1]}
    for theirs, mine in ((theirs_z, z), (theirs_mlp, mlp), (theirs_embed, resid[0])):
        assert_varies(theirs, "TransformerLens node scores")
        assert_close(mine, theirs)


# ---- 3. linearity -------------------------------------------------------------------------------
def test_per_position_scores_sum_to_all_position_scores(zoo_case, attr):
    """A first-order estimate is additive over disjoint slices of one activation."""
    for kind in ("out", "q", "k", "v"):
        assert_close(attr[f"attn_head_{kind}_by_pos"].sum(1), attr[f"attn_head_{kind}_all_pos"])
    assert_close(attr["attn_head_pattern_by_pos"].sum(-1), attr["attn_head_pattern_all_pos"])
    assert_close(attr["attn_head_pattern_dest_src_pos"].sum(-1), attr["attn_head_pattern_by_pos"])


def test_head_scores_sum_to_attn_out(zoo_case, attr):
    """``attn_out = sum_h z_h W_O[h] + b_O`` is linear in z, so the z delta maps to the attn_out
    delta and the gradient pulls back through ``W_O``: summed head estimates == attn_out estimate."""
    assert_close(attr["attn_head_out_by_pos"].sum(-1), attr["attn_out"])


def test_neuron_scores_sum_to_mlp_out(zoo_case, attr):
    """``mlp_out = post @ W_out + b_out`` is linear in the post-activation (also for gated MLPs,
    where ``hook_post`` is after the gate), so neuron estimates summed over neurons == mlp_out."""
    assert_close(attr["mlp_neuron_by_pos"].sum(-1), attr["mlp_out"])


@pytest.mark.parametrize("sweep", ["resid_pre", "attn_head_k_by_pos", "attn_head_pattern_dest_src_pos", "mlp_neuron_by_pos"])
def test_sweeps_from_one_pass_equal_single_sweeps(zoo_case, attr, sweep):
    """One pass for every sweep gives the numbers a pass for one sweep gives (extra probes are exact zeros)."""
    case = zoo_case
    single = getattr(fa, f"get_attr_patch_{sweep}")(case.model, case.clean, case.corrupted, case.scalar)
    assert_close(single, attr[sweep])


# ---- 4. shapes, reduce, every-helpers, hygiene ------------------------------------------------------
def test_shapes_match_the_exact_sweeps(zoo_case, attr):
    case = zoo_case
    cfg, n_pos = case.model.cfg, case.corrupted.shape[1]
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    expected = {
        "layer_pos": (cfg.n_layers, n_pos),
        "attn_head_out_by_pos": (cfg.n_layers, n_pos, cfg.n_heads),
        "attn_head_q_by_pos": (cfg.n_layers, n_pos, cfg.n_heads),
        "attn_head_k_by_pos": (cfg.n_layers, n_pos, n_kv),
        "attn_head_v_by_pos": (cfg.n_layers, n_pos, n_kv),
        "attn_head_pattern_by_pos": (cfg.n_layers, cfg.n_heads, n_pos),
        "attn_head_pattern_dest_src_pos": (cfg.n_layers, cfg.n_heads, n_pos, n_pos),
        "attn_head_out_all_pos": (cfg.n_layers, cfg.n_heads),
        "attn_head_q_all_pos": (cfg.n_layers, cfg.n_heads),
        "attn_head_k_all_pos": (cfg.n_layers, n_kv),
        "attn_head_v_all_pos": (cfg.n_layers, n_kv),
        "attn_head_pattern_all_pos": (cfg.n_layers, cfg.n_heads),
        "mlp_neuron_by_pos": (cfg.n_layers, n_pos, cfg.d_mlp),
    }
    for sweep in _sweeps(case):
        assert tuple(attr[sweep].shape) == expected.get(sweep, expected["layer_pos"]), sweep
        assert_varies(attr[sweep], sweep)
    # The exact sweep's grid (TransformerLens's own axis limits) for a couple of them.
    exact = fastpatch.patching.get_act_patch_attn_head_k_all_pos(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    assert exact.shape == attr["attn_head_k_all_pos"].shape


def test_reduce_none_gives_per_prompt_estimates(zoo_case, attr):
    """Per-prompt estimates (gradient of the summed [batch] metric) average to the batch-mean scalar's."""
    case = zoo_case
    per_prompt = fa.attribute_nodes(case.model, case.clean, case.corrupted, case.per_example, reduce="none")
    for sweep in _sweeps(case):
        assert per_prompt[sweep].shape == attr[sweep].shape + (case.corrupted.shape[0],)
        assert_close(per_prompt[sweep].mean(-1), attr[sweep])
    answer = int(case.clean[0, -1])  # the zoo metric's answer for prompt 0, run on prompt 0 alone
    one = fa.get_attr_patch_resid_pre(case.model, case.clean[:1], case.corrupted[:1], lambda l: l[0, -1].log_softmax(-1)[answer])
    assert_close(one, per_prompt["resid_pre"][..., 0])


def test_every_helpers_stack_like_transformer_lens(zoo_case, attr):
    case = zoo_case
    args = (case.model, case.clean, case.corrupted, case.scalar)
    n_heads = case.model.cfg.n_heads
    pad = lambda t: torch.nn.functional.pad(t, (0, n_heads - t.size(-1)))  # noqa: E731
    all_pos = fa.get_attr_patch_attn_head_all_pos_every(*args)
    expected = [attr["attn_head_out_all_pos"], attr["attn_head_q_all_pos"], pad(attr["attn_head_k_all_pos"]),
                pad(attr["attn_head_v_all_pos"]), attr["attn_head_pattern_all_pos"]]
    assert_close(all_pos, torch.stack(expected))
    by_pos = fa.get_attr_patch_attn_head_by_pos_every(*args)
    expected = [attr["attn_head_out_by_pos"], attr["attn_head_q_by_pos"], pad(attr["attn_head_k_by_pos"]),
                pad(attr["attn_head_v_by_pos"]), attr["attn_head_pattern_by_pos"].transpose(-1, -2)]
    assert_close(by_pos, torch.stack(expected))
    block = fa.get_attr_patch_block_every(*args)
    assert_close(block, torch.stack([attr["resid_pre"], attr["attn_out"], attr["mlp_out"]]))
    exact = fastpatch.patching.get_act_patch_attn_head_by_pos_every(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    assert exact.shape == by_pos.shape
    n_kv = case.model.cfg.n_key_value_heads
    if n_kv not in (None, n_heads):
        assert bool((all_pos[2:4, ..., n_kv:] == 0).all()) and bool((by_pos[2:4, ..., n_kv:] == 0).all())
    none = fa.get_attr_patch_block_every(case.model, case.clean, case.corrupted, case.per_example, reduce="none")
    assert_close(none.mean(-1), block)


def test_one_clean_forward_one_corrupted_forward_one_backward(zoo_case, monkeypatch):
    case = zoo_case
    fired, grads = [], []

    def count(module, args):
        fired.append(args[0].shape[0])

    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        grads.append(1)
        return real_grad(*args, **kwargs)

    # a module hook on the block (not a hook point, which attribution refuses) counts the forwards and survives the call
    handle = case.model.blocks[0].register_forward_pre_hook(count)
    try:
        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        fa.attribute_nodes(case.model, case.clean, case.corrupted, case.scalar)
        monkeypatch.undo()
        assert fired == [case.clean.shape[0]] * 2 and grads == [1]
        assert len(case.model.blocks[0]._forward_pre_hooks) == 1
    finally:
        handle.remove()
    assert fastpatch.hook_count(case.model) == 0


def test_no_hooks_left_and_clear_refusals(zoo_case):
    case = zoo_case
    model = case.model
    flags = fastpatch.model_flags(model)
    fa.get_attr_patch_attn_head_by_pos_every(model, case.clean, case.corrupted, case.scalar)
    assert fastpatch.hook_count(model) == 0

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, broken)
    assert fastpatch.hook_count(model) == 0 and fastpatch.model_flags(model) == flags
    with pytest.raises(ValueError, match="reduce"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, case.scalar, reduce="mean")
    with pytest.raises(ValueError, match="0-d scalar"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, case.per_example)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, case.scalar, reduce="none")
    with pytest.raises(ValueError, match="carries no gradient"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted, lambda logits: torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted[:, :-1], case.scalar)
    with pytest.raises(ValueError, match="clean_tokens"):
        fa.get_attr_patch_resid_pre(model, case.clean.float(), case.corrupted, case.scalar)
    with pytest.raises(ValueError, match="vocabulary"):
        fa.get_attr_patch_resid_pre(model, case.clean, case.corrupted + 1000, case.scalar)
    with pytest.raises(ValueError, match="unknown sweeps"):
        fa.attribute_nodes(model, case.clean, case.corrupted, case.scalar, ["nope"])
    if "blocks.0.hook_resid_mid" not in model.hook_dict:
        with pytest.raises(ValueError, match="resid_mid"):
            fa.get_attr_patch_resid_mid(model, case.clean, case.corrupted, case.scalar)
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation mode"):
            fa.get_attr_patch_mlp_out(model, case.clean, case.corrupted, case.scalar)
    finally:
        model.eval()
    assert fastpatch.hook_count(model) == 0
    params = list(model.parameters())
    assert all(p.grad is None for p in params), "attribution must not write parameter .grad"
