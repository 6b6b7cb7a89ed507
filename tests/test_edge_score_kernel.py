"""Q/K/V edge scores (edge attribution): reference vs autograd, chunked PyTorch path, Triton kernel.

What is checked, and against what:

1. ``qkv_edge_scores_reference`` against autograd through real norm modules (``torch.nn.LayerNorm``
   and ``torch.nn.RMSNorm``) in fp64: each reader's input gradient is the VJP of
   ``(norm(x) @ W_r * g_r).sum()``, contracted with the writers. A large ``eps`` makes the epsilon
   matter, and the norm's scale correction is checked to be far from negligible.
2. The chunked PyTorch path (several row chunks) and the Triton kernel (``TRITON_INTERPRET=1`` on
   CPU, set by conftest.py) against the reference on odd shapes: several writer, reader, row,
   d_model and d_head tiles, all ragged, LayerNorm and RMSNorm, fp32, outputs pre-filled with NaN.
3. ``get_attr_patch_edges(..., backend="triton")`` equal to ``"torch"`` and to ``"autograd"``
   (the VJP of the model's own ``ln1`` modules) on the zoo's GPT-2 and GPT-NeoX; a norm whose
   convention the analytic VJP does not reproduce is refused by ``"triton"`` and sent to
   autograd by ``"torch"``.
4. On a GPU (skipped without one): the compiled kernel in fp32, fp16 and bf16 against the fp32
   reference.
"""

from __future__ import annotations

import os

import pytest
import torch
import zoo
from helpers import assert_close as assert_close_scale
from helpers import assert_varies
from torch import Tensor

from fastpatch.attribution import edges as edges_mod
from fastpatch.attribution.edges import get_attr_patch_edges
from fastpatch.ops.edge_scores import norm_vjp, qkv_edge_scores, qkv_edge_scores_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5

# (writers, layers, readers per layer, batch, pos, d_model, d_head): nothing a power of two.
DOT = (19, 2, 18, 2, 11, 40, 12)  # tl.dot blocks of 16: 2 writer, 2 reader, 2 row tiles; d 32: 2 tiles
SMALL = (11, 2, 9, 2, 5, 20, 6)  # multiply-sum blocks of 8 (d 16): 2 tiles along every axis but d_head


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    S, L, R, B, P, D, E = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g) * scale + shift).to(device=device, dtype=dtype)

    writers = randn(S, B * P, D, scale=0.7)
    grads = randn(L, R, B * P, E)
    W = randn(L, R, D, E, scale=D**-0.5)
    # a per-row offset and spread of scales, so the centring and the scale's change both matter
    x = randn(L, B * P, D, scale=1.5) + randn(L, B * P, 1, scale=2.0, shift=0.5)
    norm_w = randn(L, D, scale=0.3, shift=1.0)
    return writers, grads, W, x, norm_w


def assert_close(actual: Tensor, expected: Tensor, rel: float) -> None:
    """Elementwise within ``rel`` of the output's scale, and no NaN (unwritten) element."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "unwritten (NaN) or NaN output elements"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def launcher():
    pytest.importorskip("triton")
    from csrc_triton.edge_scores import qkv_edge_scores_triton

    return qkv_edge_scores_triton


def nan_out(shape, device=DEVICE) -> Tensor:
    S, L, R = shape[:3]
    return torch.full((S, L, R), float("nan"), device=device, dtype=torch.float32)


# ---- 1. the reference against autograd through real norm modules ---------------------------------
def _norm_module(norm: str, D: int, weight: Tensor, eps: float) -> torch.nn.Module:
    if norm == "LN":
        module = torch.nn.LayerNorm(D, eps=eps, dtype=torch.float64)
        with torch.no_grad():
            module.bias.normal_()  # a bias has no Jacobian: it must not change anything
    else:
        module = torch.nn.RMSNorm(D, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _autograd_scores(writers, grads, W, x, norm_w, norm, eps) -> Tensor:
    """``[writer, layer, reader]``: per reader, autograd's gradient of ``(norm(x) @ W_r * g_r).sum()``."""
    S, L, R = writers.shape[0], grads.shape[0], grads.shape[1]
    out = torch.zeros(S, L, R, dtype=torch.float64)
    for l in range(L):
        module = _norm_module(norm, x.shape[-1], norm_w[l], eps)
        for r in range(R):
            xr = x[l].clone().requires_grad_(True)
            (G,) = torch.autograd.grad((module(xr) @ W[l, r] * grads[l, r]).sum(), xr)
            out[:, l, r] = torch.einsum("smd,md->s", writers, G)
    return out


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_reference_matches_autograd_through_norm_modules(norm):
    inputs = make_inputs((5, 2, 4, 2, 3, 24, 6), dtype=torch.float64)
    writers, grads, W, x, norm_w = inputs
    x = x * 0.15  # variance ~0.05: eps = 0.02 changes the scale by tens of percent
    eps = 0.02
    want = _autograd_scores(writers, grads, W, x, norm_w, norm, eps)
    assert_varies(want, "autograd edge scores")
    got = qkv_edge_scores_reference(writers, grads, W, x, norm_w, norm=norm, eps=eps)
    assert got.dtype == torch.float64
    assert_close(got, want, rel=1e-10)
    # the epsilon matters here, so this pins that it is used as the module uses it
    wrong = qkv_edge_scores_reference(writers, grads, W, x, norm_w, norm=norm, eps=1e-5)
    assert (wrong - want).abs().max() > 0.05 * want.abs().max()


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_norm_correction_is_not_negligible(norm):
    """Without the Jacobian's ``xhat xhat^T`` term (and centring) the scores differ by far more
    than the tolerance: the tests below would catch a kernel that skipped the correction."""
    writers, grads, W, x, norm_w = make_inputs(DOT)
    ref = qkv_edge_scores_reference(writers, grads, W, x, norm_w, norm=norm, eps=EPS)
    rstd = torch.rsqrt((x - x.mean(-1, keepdim=True) if norm == "LN" else x).pow(2).mean(-1, keepdim=True) + EPS)
    frozen = torch.einsum("smd,lrme,lrde,ld,lm->slr", writers, grads, W, norm_w, rstd[..., 0])
    assert (frozen - ref).abs().max() > 0.1 * ref.abs().max()


def test_norm_vjp_is_symmetric_jacobian():
    """``J`` is symmetric, so ``a . J^T b = b . J^T a`` (what makes the scores' split form exact)."""
    g = torch.Generator().manual_seed(3)
    x, a, b = (torch.randn(7, 30, generator=g, dtype=torch.float64) for _ in range(3))
    for norm in ("LN", "RMS"):
        lhs = (a * norm_vjp(x, b, norm, EPS)).sum(-1)
        rhs = (b * norm_vjp(x, a, norm, EPS)).sum(-1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


# ---- 2. the chunked PyTorch path and the kernel against the reference ----------------------------
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_torch_path_matches_reference(norm):
    inputs = make_inputs(DOT, seed=1)
    ref = qkv_edge_scores_reference(*inputs, norm=norm, eps=EPS)
    assert ref.shape == (19, 2, 18) and ref.dtype == torch.float32
    assert_varies(ref, "reference edge scores")
    R, D = DOT[2], DOT[5]
    for chunk in (R * D * 5, R * D * 22):  # 5 chunks (the last ragged), one chunk
        got = qkv_edge_scores(*inputs, norm=norm, eps=EPS, backend="torch", chunk_elements=chunk)
        assert_close(got, ref, rel=1e-5)
    assert torch.equal(qkv_edge_scores(*inputs, norm=norm, eps=EPS), qkv_edge_scores(*inputs, norm=norm, eps=EPS, backend="torch"))


def test_interpreter_is_set_before_kernels_import():
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.interpreter
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_kernel_matches_reference_dot_path(launcher, norm):
    """tl.dot blocks (writers 16, readers 16, rows 16, d_model 32, d_head 16), all ragged."""
    inputs = make_inputs(DOT, device=DEVICE)
    out = nan_out(DOT)
    got = launcher(*inputs, norm=norm, eps=EPS, out=out, block_s=16, block_r=16, block_m=16, block_d=32, block_e=16)
    assert got is out
    assert_close(got, qkv_edge_scores_reference(*inputs, norm=norm, eps=EPS), rel=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_kernel_matches_reference_small_blocks(launcher, norm):
    """Blocks of 8 (multiply-sums): 2 writer, 2 reader, 2 row and 2 d_model tiles, all ragged."""
    inputs = make_inputs(SMALL, device=DEVICE, seed=2)
    out = nan_out(SMALL)
    launcher(*inputs, norm=norm, eps=EPS, out=out, block_s=8, block_r=8, block_m=8, block_d=16, block_e=8)
    assert_close(out, qkv_edge_scores_reference(*inputs, norm=norm, eps=EPS), rel=1e-5)


@pytest.mark.interpreter
def test_kernel_strided_inputs_and_dispatch(launcher):
    """Non-contiguous views (a slice of the writers, transposed W and grads) through the dispatcher."""
    writers, grads, W, x, norm_w = make_inputs(DOT, device=DEVICE, seed=3)
    big = torch.randn(writers.shape[0] + 2, writers.shape[1], writers.shape[2] + 3, device=DEVICE)
    big[1:-1, :, : writers.shape[2]] = writers
    w_view = big[1:-1, :, : writers.shape[2]]
    W_t = W.transpose(2, 3).contiguous().transpose(2, 3)
    g_t = grads.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (w_view.is_contiguous() or W_t.is_contiguous() or g_t.is_contiguous())
    got = qkv_edge_scores(w_view, g_t, W_t, x, norm_w, norm="LN", eps=EPS, backend="triton")
    assert_close(got, qkv_edge_scores_reference(writers, grads, W, x, norm_w, norm="LN", eps=EPS), rel=1e-5)


def test_bad_arguments():
    writers, grads, W, x, norm_w = make_inputs(SMALL)
    kw = dict(norm="LN", eps=EPS)
    cases = [
        ((writers, grads, W, x, norm_w), dict(norm="LayerNorm"), "norm must be one of"),
        ((writers, grads, W, x, norm_w), dict(eps=-1.0), "eps must be"),
        ((writers[0], grads, W, x, norm_w), {}, "writers must be 3-D"),
        ((writers, grads, W[..., :-1], x, norm_w), {}, "W must be"),
        ((writers, grads, W, x[:, :-1], norm_w), {}, "x must be"),
        ((writers, grads, W, x, norm_w[:1]), {}, "norm_w must be"),
        ((writers, grads.long(), W, x, norm_w), {}, "floating-point"),
    ]
    for args, changes, match in cases:
        for fn in (qkv_edge_scores_reference, qkv_edge_scores):
            with pytest.raises(ValueError, match=match):
                fn(*args, **{**kw, **changes})
    with pytest.raises(ValueError, match="backend must be one of"):
        qkv_edge_scores(writers, grads, W, x, norm_w, **kw, backend="cuda")
    with pytest.raises(ValueError, match="supports"):
        qkv_edge_scores(writers.double(), grads, W, x, norm_w, **kw, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_kernel_cuda_dtypes(launcher, dtype, rel, norm):
    """Compiled kernel, default and small blocks, against the fp32 reference of the same (rounded) inputs."""
    for shape, blocks in (((37, 3, 36, 4, 33, 200, 64), {}), (DOT, dict(block_s=16, block_r=16, block_m=16, block_d=16, block_e=16))):
        inputs = make_inputs(shape, dtype=dtype, device="cuda")
        out = nan_out(shape, device="cuda")
        launcher(*inputs, norm=norm, eps=EPS, out=out, **blocks)
        ref = qkv_edge_scores_reference(*[t.float() for t in inputs], norm=norm, eps=EPS)
        assert_close(out, ref, rel=rel)
        assert_close(qkv_edge_scores(*inputs, norm=norm, eps=EPS), ref, rel=rel)  # auto: the kernel on CUDA


# ---- 3. wired into get_attr_patch_edges ----------------------------------------------------------
def _metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 11]).mean()


@pytest.fixture(scope="module", params=["gpt2", "neox"])
def case(request):
    return zoo.Case.build(request.param, batch=2, n_pos=5, first_diff=2)


@pytest.fixture(scope="module")
def runs(case):
    return {b: get_attr_patch_edges(case.model, case.clean, case.corrupted, _metric, backend=b) for b in ("autograd", "torch", "triton")}


def test_edges_triton_equals_torch_and_autograd(case, runs):
    model = case.model
    ref = runs["autograd"]
    assert_varies(ref.scores[ref.valid], "edge scores")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    qkv = torch.tensor([not name.endswith((".in", "logits")) for name in ref.reader_names])
    assert qkv.sum() == 3 * L * H
    assert_varies(ref.scores[:, qkv][ref.valid[:, qkv]], "Q/K/V edge scores")
    for b in ("torch", "triton"):
        assert torch.equal(runs[b].valid, ref.valid) and runs[b].reader_names == ref.reader_names
        assert_close_scale(runs[b].scores, ref.scores)


def test_unsupported_norm_convention(case, runs, monkeypatch):
    """An epsilon the model's ln1 does not use: the autograd check catches it; triton refuses,
    torch falls back to autograd (the same numbers as backend='autograd'). A norm type without an
    analytic VJP is refused by triton before any pass."""
    model = case.model
    monkeypatch.setattr(edges_mod, "_ln1_eps", lambda model, ln1: 0.5)
    with pytest.raises(ValueError, match="backend='triton' needs LayerNorm/RMSNorm.*differs"):
        get_attr_patch_edges(model, case.clean, case.corrupted, _metric, backend="triton")
    got = get_attr_patch_edges(model, case.clean, case.corrupted, _metric, backend="torch")
    assert torch.equal(got.scores, runs["autograd"].scores)
    monkeypatch.undo()
    monkeypatch.setattr(model.cfg, "normalization_type", None)
    with pytest.raises(ValueError, match="normalization_type=None"):
        get_attr_patch_edges(model, case.clean, case.corrupted, _metric, backend="triton")
