"""Every architecture family of ``zoo.ARCH_ZOO`` against TransformerLens, on both backends.

Per architecture (2 layers, tiny, wide init, norms perturbed), one compact check per kind of sweep:
head output (all positions, with ``LogitDiff``, which reads two logit columns on the native
backend), ``resid_pre`` and ``block_every`` (resid_pre, attn_out and mlp_out; slow) equal
``transformer_lens.patching``'s values on the native and the hook backend, and ``last_run_stats``
shows the backend asked for really ran; attribution equals the autograd directional derivative;
direct path equals TransformerLens's where it defines it, and is refused alike where it does not.
Architectures the native backend cannot run fall back to hooks under ``"auto"`` with one warning
naming the reason and give TransformerLens's values; ``"native"`` raises that reason.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

import fastpatch
from fastpatch import attribution as fa
from fastpatch import patching as fp
from fastpatch.engine.native import UnsupportedModel
from fastpatch.engine.native.model import NativeModel, ParityError
from fastpatch.metrics import LogitDiff

NATIVE = ["bloom", "falcon", "gemma", "gemma2", "gemma3", "glm4_moe", "gptj", "mistral", "mixtral", "olmo", "olmo2", "opt",
          "phi", "phi3", "qwen2", "qwen3", "stablelm"]
# one family per native feature runs by default; the families whose features these cover run under -m slow
COVERED = {"falcon", "gemma", "mistral", "phi", "phi3", "qwen2", "stablelm"}  # gptj: shared norm; gemma2/3: Gemma's
# hooks only, and the reason the fallback names
HOOKS_ONLY = {
    "deepseek_v2": "NotImplementedError: W_Q is not available on MLA",
    "gemma4": "PerLayerGeometryError: Cannot split",  # a ValueError subclass from the bridge's W_Q
    "jamba": "'none' positions",
}
BACKENDS = ("native", "hooks")
FORK_AFTER_NORM = {"bloom"}  # TransformerLens's Q/K/V fork adds a direct-path write after ln1 (BLOOM's block)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in COVERED else n for n in NATIVE])
def arch_case(request):
    return zoo.arch_case(request.param)


def test_sweeps_match_transformer_lens_on_both_backends(arch_case):
    case = arch_case
    logit_diff = LogitDiff(case.clean[:, -1], case.corrupted[:, -1])
    args = (case.model, case.corrupted, case.clean_cache)
    refs = {
        "head_out": tl.get_act_patch_attn_head_out_all_pos(*args, logit_diff),
        "resid_pre": tl.get_act_patch_resid_pre(*args, case.scalar),
    }
    for name, ref in refs.items():
        assert_varies(ref, f"{case.name} {name}")
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the native backend runs here: no fallback warning
            ours = {
                "head_out": fp.get_act_patch_attn_head_out_all_pos(*args, logit_diff, progress=False, backend=backend),
                "resid_pre": fp.get_act_patch_resid_pre(*args, case.scalar, progress=False, backend=backend),
            }
            assert fastpatch.last_run_stats()["backend"] == backend
            # auto picks the native backend on these architectures
            fp.get_act_patch_resid_pre(*args, case.scalar, progress=False)
            assert fastpatch.last_run_stats()["backend"] == "native"
        for name, ref in refs.items():
            assert_close(ours[name], ref)


@pytest.mark.slow  # TransformerLens's loop over 3 components x layers x positions
def test_every_component_matches_transformer_lens_on_both_backends(arch_case):
    case = arch_case
    args = (case.model, case.corrupted, case.clean_cache, case.scalar)
    ref = tl.get_act_patch_block_every(*args)
    assert_varies(ref)
    for backend in BACKENDS:
        assert_close(fp.get_act_patch_block_every(*args, progress=False, backend=backend), ref)
        assert fastpatch.last_run_stats()["backend"] == backend


def test_attribution_matches_autograd(arch_case):
    """Head-output attribution (all positions) is ``sum (z_clean - z_corr) * d metric / d z`` at the
    corrupted run: the same directional derivative taken here with autograd through the model's own hooks."""
    case = arch_case
    model, n_layers = case.model, case.model.cfg.n_layers
    ours = fa.get_attr_patch_attn_head_out_all_pos(model, case.clean, case.corrupted, case.scalar)
    acts = {}

    def keep(act, hook):  # the activation itself: gradients reach it through every later layer
        acts[hook.name] = act
        return act

    names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    with torch.enable_grad():
        metric = case.scalar(model.run_with_hooks(case.corrupted, fwd_hooks=[(n, keep) for n in names]))
        grads = dict(zip(names, torch.autograd.grad(metric, [acts[n] for n in names])))
    ref = torch.stack([((case.clean_cache[n] - acts[n].detach()) * grads[n]).sum(dim=(0, 1, 3)) for n in names])
    assert_varies(ref)
    assert_close(ours, ref)


def test_direct_path_matches_transformer_lens_where_it_is_defined(arch_case):
    case = arch_case
    with torch.no_grad():
        _, corrupted_cache = case.model.run_with_cache(case.corrupted)
    args = (case.model, case.corrupted, case.clean_cache, corrupted_cache, case.scalar, 0, 1, "q")
    try:
        ref = tl.get_act_patch_direct_path(*args, verbose=False)
    except (ValueError, NotImplementedError) as refusal:
        with pytest.raises(type(refusal)):  # the hook backend refuses alike (before any patched forward)
            fp.get_act_patch_direct_path(*args, verbose=False, backend="hooks")
        if isinstance(refusal, ValueError):  # TransformerLens's model rules: the native backend refuses too
            with pytest.raises(ValueError):
                fp.get_act_patch_direct_path(*args, verbose=False, backend="native")
        return
    assert_varies(ref[1:])
    if case.name in FORK_AFTER_NORM:  # TransformerLens adds the write after ln1 there: hooks give its values
        with pytest.raises(UnsupportedModel, match="take the write after the norm"):
            fp.get_act_patch_direct_path(*args, verbose=False, backend="native")
        with pytest.warns(UserWarning, match="take the write after the norm; using hooks"):
            assert_close(fp.get_act_patch_direct_path(*args, verbose=False), ref)
        assert_close(fp.get_act_patch_direct_path(*args, verbose=False, backend="hooks"), ref)
        return
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_close(fp.get_act_patch_direct_path(*args, verbose=False, backend=backend), ref)
        assert fastpatch.last_run_stats()["backend"] == backend


@pytest.mark.parametrize("name", sorted(HOOKS_ONLY))
def test_unsupported_architectures_fall_back_with_one_warning(name):
    case = zoo.arch_case(name)
    args = (case.model, case.corrupted, case.clean_cache, case.scalar)
    with pytest.warns(UserWarning, match="native backend unsupported for .*: .*using hooks, expect about TransformerLens speed") as seen:
        ours = fp.get_act_patch_resid_pre(*args, progress=False)
    assert any(HOOKS_ONLY[name] in str(w.message) for w in seen)
    assert fastpatch.last_run_stats()["backend"] == "hooks"
    ref = tl.get_act_patch_resid_pre(*args)
    assert_varies(ref)
    assert_close(ours, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model, whatever the sweep
        fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, lambda logits: -case.scalar(logits),
                                   progress=False)
    with pytest.raises(UnsupportedModel, match=f"native backend unsupported for .*{HOOKS_ONLY[name]}"):
        fp.get_act_patch_resid_pre(*args, progress=False, backend="native")


def test_direct_path_refuses_a_block_without_attention_before_any_forward():
    """Jamba's block 0 is a Mamba mixer: direct paths from it are refused by TransformerLens's rule,
    before a single forward (the model's forward is made to fail to prove it)."""
    case = zoo.arch_case("jamba")
    with torch.no_grad():
        _, corrupted_cache = case.model.run_with_cache(case.corrupted)
    args = (case.model, case.corrupted, case.clean_cache, corrupted_cache, case.scalar)
    handle = case.model.blocks[0].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("forward ran")))
    try:
        for backend in ("auto", "hooks"):
            with pytest.raises(ValueError, match="has no `attn` component"):
                fp.get_act_patch_direct_path(*args, 0, 0, "q", verbose=False, backend=backend)
            with pytest.raises(ValueError, match="has no `attn` component"):
                fp.get_act_patch_direct_path_all_sources(*args, "mlp_in", verbose=False, backend=backend)
    finally:
        handle.remove()


def test_direct_path_refuses_readers_without_a_qkv_fork_on_hooks():
    """GPT-J's attention bridge has no per-head Q/K/V input fork: hook-based Q/K/V direct paths would
    patch nothing, so the hook backend refuses them before any patched forward (TransformerLens
    refuses too); the native backend computes them: checked against a plain loop that patches the
    reader head's q with its re-normalised input (``ln1(resid_pre + write) @ W_Q``)."""
    case = zoo.arch_case("gptj")
    with torch.no_grad():
        _, corrupted_cache = case.model.run_with_cache(case.corrupted)
    args = (case.model, case.corrupted, case.clean_cache, corrupted_cache, case.scalar, 0, 1, "q")
    with pytest.raises(NotImplementedError):
        tl.get_act_patch_direct_path(*args, verbose=False)
    with pytest.raises(ValueError, match="has no per-head pre-Q/K/V fork"):
        fp.get_act_patch_direct_path(*args, verbose=False, backend="hooks")
    ours = fp.get_act_patch_direct_path(*args, verbose=False, backend="native")
    assert fastpatch.last_run_stats()["backend"] == "native"
    model, ref = case.model, torch.zeros_like(ours)
    W_O = model.blocks[0].attn.W_O[1]
    delta = case.clean_cache["blocks.0.attn.hook_z"][:, :, 1] @ W_O - corrupted_cache["blocks.0.attn.hook_z"][:, :, 1] @ W_O
    ln1 = model.blocks[1].ln1
    x = corrupted_cache["blocks.1.hook_resid_pre"] + delta
    normalized = torch.nn.functional.layer_norm(x, x.shape[-1:], ln1.w, ln1.b, model.cfg.eps)
    b_Q = model.blocks[1].attn.b_Q  # GPT-J's q_proj has a bias
    for head in range(model.cfg.n_heads):
        q_head = normalized @ model.blocks[1].attn.W_Q[head] + b_Q[head]

        def patch(act, hook, q_head=q_head, head=head):
            act = act.clone()
            act[:, :, head] = q_head
            return act

        with torch.no_grad():
            ref[1, head] = case.scalar(model.run_with_hooks(case.corrupted, fwd_hooks=[("blocks.1.attn.hook_q", patch)]))
    assert_varies(ref[1])
    assert_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the matmul-per-expert path
@pytest.mark.parametrize("n_tokens", [40, 3])  # every expert used / some experts without a token
def test_mixture_of_experts_equals_the_hugging_face_block(dtype, n_tokens):
    """The native MoE (pairs sorted by expert, one grouped matmul) on random inputs equals the model's
    own Hugging Face block with its eager loop over the experts."""
    model = zoo.ARCH_ZOO["mixtral"]()
    moe = NativeModel(model).layers[0].moe
    moe = dataclasses.replace(moe, **{f: getattr(moe, f).to(dtype) for f in ("router", "W_gate", "W_in", "W_out")})
    block = copy.deepcopy(model.blocks[0].mlp.original_component).to(dtype)
    if hasattr(getattr(block.experts, "config", None), "_experts_implementation"):
        block.experts.config._experts_implementation = "eager"  # the reference: Hugging Face's loop over experts
    h = torch.randn(1, n_tokens, model.cfg.d_model, generator=torch.Generator().manual_seed(n_tokens), dtype=dtype)
    with torch.no_grad():
        ref = block(h)
        ref = ref[0] if isinstance(ref, tuple) else ref
        chosen = (h.reshape(n_tokens, -1) @ moe.router).topk(moe.top_k, dim=-1).indices
        ours = NativeModel.experts(None, moe, h)
    # 40 tokens reach every expert; 3 tokens leave one without any (an empty group)
    assert (len(chosen.unique()) == moe.router.shape[1]) == (n_tokens == 40)
    assert_varies(ref)
    assert_close(ours, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_a_cfg_stating_qk_norm_is_no_refusal():
    """GLM-4-MoE's bridge states ``cfg.use_qk_norm=True``: the native forward reads the norm from the
    attention's q_norm / k_norm (test_sweeps_match_transformer_lens_on_both_backends checks the values)."""
    model = zoo.ARCH_ZOO["glm4_moe"]()
    native = NativeModel(model)
    assert model.cfg.use_qk_norm
    assert all(L.q_norm_w is not None and L.k_norm_w is not None for L in native.layers)


def test_parity_check_of_the_last_position_logits_catches_a_missing_logit_cap(monkeypatch):
    """The parity run unembeds the last position only; a feature acting after the last block (here
    Gemma 2's output soft cap, left out) still shows there, named as the logits."""
    case = zoo.arch_case("gemma2")
    monkeypatch.setattr(NativeModel, "cap_logits", lambda self, logits: logits)
    with pytest.raises(ParityError, match="disagrees with the model at logits"):
        NativeModel.checked(case.model, case.corrupted)
