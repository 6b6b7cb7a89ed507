"""GradDrop (AtP*, Kramar et al. 2024): fastpatch.attribution.get_attr_patch_graddrop.

1. Against a plain reference loop written here without the library's gradient machinery: for
   every layer ``l``, ``x.detach()`` hooks on ``blocks.{l}.hook_attn_out`` / ``hook_mlp_out``,
   the activations read through ``clone()`` + ``autograd.grad`` (not zero probes), one corrupted
   forward and backward per ``l``, ``(clean - corrupted) . grad`` summed by hand-written
   reducers and averaged with ``1 / (L - 1)``. float32 on gpt2 and neox (parallel blocks).
2. Identities that hold exactly: a last-layer node's estimate is plain attribution; head
   estimates sum to ``attn_out``'s and neuron estimates to ``mlp_out``'s; per-prompt estimates
   average to the batch-mean metric's.
3. A deliberately built cancellation: a head whose direct effect on the metric is cancelled *in
   the gradient* by a saturating MLP neuron of the next layer; plain attribution gives it ~0
   although it has the largest exact patch effect, and GradDrop recovers it.
4. Hygiene and refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies

import fastpatch
from fastpatch import attribution as refine  # graddrop
from fastpatch import patching
from fastpatch.attribution import nodes

# sweep -> (hook name of layer l, hand-written reducer of [batch, ...] per-element scores)
REFERENCE = {
    "attn_head_out_all_pos": (lambda l: f"blocks.{l}.attn.hook_z", lambda p: p.sum((0, 1, 3))),
    "attn_head_out_by_pos": (lambda l: f"blocks.{l}.attn.hook_z", lambda p: p.sum((0, 3))),
    "attn_head_v_all_pos": (lambda l: f"blocks.{l}.attn.hook_v", lambda p: p.sum((0, 1, 3))),
    "attn_head_pattern_dest_src_pos": (lambda l: f"blocks.{l}.attn.hook_pattern", lambda p: p.sum(0)),
    "mlp_neuron_by_pos": (lambda l: f"blocks.{l}.mlp.hook_post", lambda p: p.sum(0)),
    "attn_out": (lambda l: f"blocks.{l}.hook_attn_out", lambda p: p.sum((0, 2))),
    "mlp_out": (lambda l: f"blocks.{l}.hook_mlp_out", lambda p: p.sum((0, 2))),
}


def _detach(act, hook):
    return act.detach()


def _reference(model, clean_tokens, corrupted_tokens, metric, sweep):
    """``[L, L, *cell]``: the drop-``l`` estimate of every cell, for every ``l`` (plain loop)."""
    name_of, reducer = REFERENCE[sweep]
    n_layers = model.cfg.n_layers
    names = [name_of(l) for l in range(n_layers)]
    clean = {}

    def save(act, hook):
        clean[hook.name] = act.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, save) for n in names]):
        model(clean_tokens)
    per_drop = []
    for drop in range(n_layers):
        outs, corrupted = {}, {}

        def keep(act, hook):
            corrupted[hook.name] = act.detach().clone()
            outs[hook.name] = act.clone()  # differentiable copy the model consumes: its grad is the activation's
            return outs[hook.name]

        # the readers first, so a stop-gradient on the same hook point (attn_out, mlp_out) acts after them
        hooks = [(n, keep) for n in names] + [(f"blocks.{drop}.hook_attn_out", _detach), (f"blocks.{drop}.hook_mlp_out", _detach)]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            value = metric(model(corrupted_tokens))
            grads = torch.autograd.grad(value, [outs[n] for n in names], allow_unused=True)
        grads = [torch.zeros_like(outs[n]) if g is None else g for n, g in zip(names, grads)]
        # dropping a node's own layer removes every path from it (the definition's premise)
        assert float(grads[drop].abs().max()) == 0.0, (sweep, drop)
        per_drop.append(torch.stack([reducer((clean[n] - corrupted[n]) * g) for n, g in zip(names, grads)]))
    return torch.stack(per_drop)


@pytest.fixture(scope="module", params=["gpt2", "neox"])
def case(request):
    return zoo.Case.build(request.param)


# ---- 1. the reference loop ------------------------------------------------------------------------
@pytest.mark.parametrize("sweep", sorted(REFERENCE))
def test_graddrop_equals_plain_reference_loop(case, sweep):
    model = case.model
    n_layers = model.cfg.n_layers
    per_drop = _reference(model, case.clean, case.corrupted, case.scalar, sweep)
    expected = per_drop.sum(0) / (n_layers - 1)
    ours = refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.scalar, sweep)
    assert_varies(expected, sweep)
    assert_close(ours, expected)
    # the drops matter: below the last layer GradDrop is not plain attribution
    plain = getattr(nodes, f"get_attr_patch_{sweep}")(model, case.clean, case.corrupted, case.scalar)
    assert float((ours[:-1] - plain[:-1]).abs().max()) > 1e-2 * float(plain.abs().max()), sweep
    # absolute=True: |each drop's estimate| averaged
    absolute = refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.scalar, sweep, absolute=True)
    assert_close(absolute, per_drop.abs().sum(0) / (n_layers - 1))


def test_graddrop_reduce_none(case):
    model, sweep = case.model, "attn_head_out_by_pos"
    scalar = refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.scalar, sweep)
    per = refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.per_example, sweep, reduce="none")
    assert per.shape == scalar.shape + (case.clean.shape[0],)
    assert_close(per.mean(-1), scalar)
    # absolute=True with reduce='none': |.| of each drop's estimate per prompt, i.e. the estimate
    # for that prompt alone (the paper's expectation of magnitudes is then .mean(-1))
    per_abs = refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.per_example, sweep, reduce="none", absolute=True)
    assert per_abs.shape == per.shape
    assert bool((per_abs >= per.abs() - 1e-6).all())  # triangle inequality
    for i in range(case.clean.shape[0]):
        answer = int(case.clean[i, -1])
        alone = refine.get_attr_patch_graddrop(
            model, case.clean[i:i + 1], case.corrupted[i:i + 1], lambda logits: logits[0, -1].log_softmax(-1)[answer], sweep, absolute=True
        )
        assert_close(per_abs[..., i], alone)


# ---- 2. identities ----------------------------------------------------------------------------------
def test_graddrop_identities(zoo_case):
    case = zoo_case
    model, args = case.model, (case.model, case.clean, case.corrupted, case.scalar)
    heads = refine.get_attr_patch_graddrop(*args, "attn_head_out_by_pos")
    attn_out = refine.get_attr_patch_graddrop(*args, "attn_out")
    neurons = refine.get_attr_patch_graddrop(*args, "mlp_neuron_by_pos")
    mlp_out = refine.get_attr_patch_graddrop(*args, "mlp_out")
    assert_varies(heads, "GradDrop heads")
    # linear maps z -> attn_out and post -> mlp_out: the same under every drop
    assert_close(heads.sum(-1), attn_out)
    assert_close(neurons.sum(-1), mlp_out)
    # last layer: no later layer to drop, own drop is 0, the other L-1 are plain attribution
    for sweep, ours in (("attn_head_out_by_pos", heads), ("mlp_out", mlp_out)):
        plain = getattr(nodes, f"get_attr_patch_{sweep}")(*args)
        assert_close(ours[-1], plain[-1])
    assert fastpatch.hook_count(model) == 0


# ---- 3. cancellation ----------------------------------------------------------------------------------
def _cancelling_case(seed: int, K: float = 8.0, neuron: int = 0):
    """A 2-layer gpt2 in which one layer-0 head's gradient is cancelled by a saturating neuron.

    Layer 1 is first silenced (attention output and MLP output weights zero), so a layer-0 head
    acts on the metric (a logit difference at the last position, one prompt) only directly; ``h0``
    is the head with the largest exact patch effect. Then MLP-1 neuron ``neuron`` is rebuilt: its
    input weights read the direction in which patching ``h0`` moves the MLP-1 input at the last
    position, scaled so that its pre-activation is 0 on the corrupted run (GELU slope 1/2) and
    ``-K`` once ``h0`` is patched (GELU(-K) ~ 0 = GELU(0): the neuron's *actual* response to the
    patch is nil); its output writes ``s`` times the unembedding direction of the logit
    difference. On the corrupted run the neuron outputs 0 whatever ``s``, so the gradient at
    ``h0`` is affine in ``s``; ``s`` is set where it is 0: the neuron's linearised indirect effect
    cancels the direct effect in the gradient, while the exact effect is the direct one.
    Returns (model, clean, corrupted, metric, h0, plain attribution before the neuron).
    """
    model = zoo.gpt2(seed=seed, n_layers=2)
    clean, corrupted = zoo.prompt_pair(batch=1)
    answer, wrong = int(clean[0, -1]), int(corrupted[0, -1])
    metric = lambda logits: (logits[:, -1, answer] - logits[:, -1, wrong]).mean()  # noqa: E731
    attn1, mlp1 = model.blocks[1].attn, model.blocks[1].mlp
    w_in, b_in = mlp1.get_submodule("in")._original_component.weight, mlp1.get_submodule("in")._original_component.bias  # Conv1D [d_model, d_mlp]
    w_out = mlp1.out._original_component.weight  # [d_mlp, d_model]
    with torch.no_grad():
        attn1.o._original_component.weight.zero_()
        attn1.o._original_component.bias.zero_()
        w_out.zero_()
        mlp1.out._original_component.bias.zero_()
        _, cache = model.run_with_cache(clean)
    base = metric(model(corrupted)).detach()
    exact = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False)[0] - base
    h0 = int(exact.abs().argmax())
    before = nodes.get_attr_patch_attn_head_out_all_pos(model, clean, corrupted, metric)

    seen = {}

    def read(key):
        def hook(act, hook):
            seen[key] = act[0, -1].detach().clone()

        return hook

    def patch_h0(z, hook):
        z = z.clone()
        z[:, :, h0] = cache["blocks.0.attn.hook_z"][:, :, h0]
        return z

    with torch.no_grad():
        with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_in", read("corrupted"))]):
            model(corrupted)
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", patch_h0), ("blocks.1.mlp.hook_in", read("patched"))]):
            model(corrupted)
        move = seen["patched"] - seen["corrupted"]
        w = -K * move / move.dot(move)
        w_in[:, neuron] = w
        b_in[neuron] = -w.dot(seen["corrupted"])
        w_u = model.original_model.lm_head.weight
        direction = w_u[answer] - w_u[wrong]
        direction = direction / direction.norm()

    def gradient_at_h0(s):
        with torch.no_grad():
            w_out[neuron] = s * direction
        return float(nodes.get_attr_patch_attn_head_out_all_pos(model, clean, corrupted, metric)[0, h0])

    g0, g1 = gradient_at_h0(0.0), gradient_at_h0(1.0)
    gradient_at_h0(-g0 / (g1 - g0))
    return model, clean, corrupted, metric, h0, before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graddrop_recovers_a_head_whose_gradient_cancels(seed):
    model, clean, corrupted, metric, h0, before = _cancelling_case(seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        base = metric(model(corrupted))
    exact = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False) - base
    plain = nodes.get_attr_patch_attn_head_out_all_pos(model, clean, corrupted, metric)
    graddrop = refine.get_attr_patch_graddrop(model, clean, corrupted, metric)
    # the neuron is saturated: the exact effect of h0 is still its direct effect, and the largest
    assert abs(float(exact[0, h0])) > 0.3
    assert abs(float(exact[0, h0])) == float(exact.abs().max())
    # plain attribution: cancelled to float noise, ranked last among the layer-0 heads
    assert abs(float(plain[0, h0])) < 1e-5 * float(plain.abs().max() + exact.abs().max())
    assert int(plain[0].abs().argmin()) == h0
    # GradDrop: dropping layer 1 removes exactly the cancelling path, so it gives what attribution
    # patching gave before the neuron existed -- a large estimate of the right sign, ranked first
    assert_close(graddrop[0], before[0])
    assert float(graddrop[0, h0]) * float(exact[0, h0]) > 0
    assert abs(float(graddrop[0, h0])) > 0.5 * abs(float(exact[0, h0]))
    assert int(graddrop[0].abs().argmax()) == h0
    assert fastpatch.hook_count(model) == 0


def test_cancelling_neuron_is_saturated():
    """The construction's premise, measured: the neuron changes h0's exact effect by ~nothing."""
    model, clean, corrupted, metric, h0, _ = _cancelling_case(0)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        base = metric(model(corrupted))
    with_neuron = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False)[0, h0] - base
    w_out = model.blocks[1].mlp.out._original_component.weight
    with torch.no_grad():
        w_out.zero_()
        base0 = metric(model(corrupted))
    without = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False)[0, h0] - base0
    assert abs(float(with_neuron - without)) < 1e-3 * abs(float(without))


# ---- 4. hygiene and refusals ----------------------------------------------------------------------
def test_graddrop_leaves_the_model_alone_and_refuses_bad_input():
    case = zoo.Case.build("gpt2")
    model = case.model
    flags = fastpatch.model_flags(model)
    refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, case.scalar)
    assert fastpatch.hook_count(model) == 0 and fastpatch.model_flags(model) == flags
    assert all(p.grad is None for p in model.parameters())
    copy.deepcopy(model)  # no autograd graph left on the model's modules

    args = (model, case.clean, case.corrupted, case.scalar)
    with pytest.raises(ValueError, match="residual stream"):
        refine.get_attr_patch_graddrop(*args, "resid_pre")
    with pytest.raises(ValueError, match="unknown sweep"):
        refine.get_attr_patch_graddrop(*args, "nope")
    with pytest.raises(ValueError, match="2-D"):
        refine.get_attr_patch_graddrop(model, case.clean[0], case.corrupted[0], case.scalar)
    with pytest.raises(ValueError, match="same shape"):
        refine.get_attr_patch_graddrop(model, case.clean, case.corrupted[:, :-1], case.scalar)
    with pytest.raises(ValueError, match="reduce"):
        refine.get_attr_patch_graddrop(*args, reduce="mean")

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        refine.get_attr_patch_graddrop(model, case.clean, case.corrupted, broken)
    assert fastpatch.hook_count(model) == 0
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation mode"):
            refine.get_attr_patch_graddrop(*args)
    finally:
        model.eval()
    one_layer = zoo.gpt2(n_layers=1)
    with pytest.raises(ValueError, match="at least 2 layers"):
        refine.get_attr_patch_graddrop(one_layer, case.clean, case.corrupted, case.scalar)
    assert fastpatch.hook_count(model) == 0
