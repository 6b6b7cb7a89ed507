"""Delta projection (direct path patching): reference vs an independent loop, vs the Triton kernel.

The kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py before any
kernel module is imported) on small odd shapes with small blocks, so every tiled dimension has
several blocks and a ragged last one; on a GPU the same bodies run on CUDA, plus bf16/fp16.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastpatch.ops.delta_projection import delta_projection, delta_projection_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5

# (src, layer, batch, pos, d_model, n_out): not powers of two.
ODD = (3, 2, 3, 5, 40, 36)  # 15 rows
ODD_ROWS = (3, 2, 3, 7, 40, 36)  # 21 rows: two row tiles of 16 (tl.dot needs blocks >= 16)

# (mode, norm, with LN bias)
CASES = [
    ("exact", "LN", True),
    ("exact", "LN", False),
    ("exact", "RMS", False),
    ("linear", "LN", True),
    ("linear", "RMS", False),
]


def _ids(case):
    mode, norm, bias = case
    return f"{mode}-{norm}" + ("-bias" if bias else "")


def make_inputs(shape, norm: str, bias: bool, dtype=torch.float32, device="cpu", seed=0):
    S, L, B, P, D, N = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g) * scale + shift).to(device=device, dtype=dtype)

    delta = randn(S, B, P, D, scale=0.7)
    # A non-zero mean per row and a spread of scales, so centring and the scale both matter.
    resid = randn(L, B, P, D, scale=1.5) + randn(L, B, P, 1, scale=2.0, shift=0.5)
    norm_w = randn(L, D, scale=0.3, shift=1.0)
    norm_b = randn(L, D, scale=0.5) if (norm == "LN" and bias) else None
    W = randn(L, D, N, scale=D**-0.5)
    return delta, resid, norm_w, norm_b, W


def loop_oracle(
    delta: Float[Tensor, "src batch pos d_model"],
    resid: Float[Tensor, "layer batch pos d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    norm_b: Optional[Float[Tensor, "layer d_model"]],
    W: Float[Tensor, "layer d_model n_out"],
    mode: str,
    norm: str,
    eps: float,
) -> Float[Tensor, "src layer batch pos n_out"]:
    """One (source, layer) at a time in fp64, with F.layer_norm / an explicit RMS formula."""
    S, L = delta.shape[0], resid.shape[0]
    d, r, w, W = delta.double(), resid.double(), norm_w.double(), W.double()
    b = norm_b.double() if norm_b is not None else None
    D = d.shape[-1]
    out = []
    for s in range(S):
        per_layer = []
        for l in range(L):
            if mode == "exact":
                x = r[l] + d[s]
                if norm == "LN":
                    y = F.layer_norm(x, (D,), w[l], None if b is None else b[l], eps)
                else:
                    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w[l]
            else:
                if norm == "LN":
                    scale = torch.sqrt(r[l].var(-1, unbiased=False, keepdim=True) + eps)
                    y = (d[s] - d[s].mean(-1, keepdim=True)) / scale * w[l]
                else:
                    scale = torch.sqrt((r[l] * r[l]).mean(-1, keepdim=True) + eps)
                    y = d[s] / scale * w[l]
            per_layer.append(y @ W[l])
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def assert_close(actual: Tensor, expected: Tensor, rel: float) -> None:
    """Elementwise within ``rel`` of the output's scale (and no NaN anywhere)."""
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "unwritten (NaN) or NaN output elements"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def launcher():
    pytest.importorskip("triton")
    from csrc_triton.delta_projection import delta_projection_triton

    return delta_projection_triton


def nan_out(delta: Tensor, L: int, N: int) -> Tensor:
    S, B, P, _ = delta.shape
    return torch.full((S, L, B, P, N), float("nan"), device=delta.device, dtype=delta.dtype)


# ---- reference -----------------------------------------------------------------------------------


def test_interpreter_is_set_before_kernels_import():
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_loop(case):
    mode, norm, bias = case
    inputs = make_inputs(ODD, norm, bias)
    ref = delta_projection_reference(*inputs, mode=mode, norm=norm, eps=EPS)
    assert ref.shape == (3, 2, 3, 5, 36) and ref.dtype == torch.float32
    assert_close(ref, loop_oracle(*inputs, mode=mode, norm=norm, eps=EPS), rel=1e-5)


def test_reference_returns_input_dtype():
    inputs = make_inputs(ODD, "LN", True, dtype=torch.bfloat16)
    out = delta_projection_reference(*inputs, mode="exact", norm="LN", eps=EPS)
    assert out.dtype == torch.bfloat16
    assert_close(out, loop_oracle(*inputs, mode="exact", norm="LN", eps=EPS), rel=2e-2)


def _scale_preserving(delta: Tensor, resid: Tensor, norm: str) -> Tensor:
    """``delta`` with each row made orthogonal to every layer's (centred) residual row.

    Along such a direction the norm's scale changes only at second order, so the frozen-scale
    linearisation is the exact first-order change.
    """
    c = resid - resid.mean(-1, keepdim=True) if norm == "LN" else resid  # [layer, batch, pos, d]
    d = delta - delta.mean(-1, keepdim=True) if norm == "LN" else delta
    q, _ = torch.linalg.qr(c.permute(1, 2, 3, 0))  # [batch, pos, d, layer], orthonormal columns
    return d - torch.einsum("bpdl,bpel,sbpe->sbpd", q, q, d)


def _fd_errors(delta, resid, norm_w, norm_b, W, norm):
    """max |exact(h delta) - exact(0) - linear(h delta)| for h = 1e-2, 5e-3, 2.5e-3 (fp64)."""
    kw = dict(norm=norm, eps=EPS)
    base = delta_projection_reference(torch.zeros_like(delta[:1]), resid, norm_w, norm_b, W, mode="exact", **kw)
    errors, sizes = [], []
    for h in (1e-2, 5e-3, 2.5e-3):
        change = delta_projection_reference(h * delta, resid, norm_w, norm_b, W, mode="exact", **kw) - base
        linear = delta_projection_reference(h * delta, resid, norm_w, norm_b, W, mode="linear", **kw)
        errors.append((change - linear).abs().max().item())
        sizes.append(linear.abs().max().item())
    return errors, sizes


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_linear_is_first_order_of_exact(norm):
    """exact(h delta) - exact(0) = linear(h delta) + O(h^2) for a delta that keeps the scale.

    For a general delta the frozen-scale linearisation misses the first-order change of the
    norm's scale (``test_linear_omits_only_the_scale_change``), so the error would be O(h).
    """
    delta, resid, norm_w, norm_b, W = make_inputs(ODD, norm, True, dtype=torch.float64)
    delta = _scale_preserving(delta, resid, norm)
    errors, sizes = _fd_errors(delta, resid, norm_w, norm_b, W, norm)
    for err, size in zip(errors, sizes):
        assert err < 0.02 * size, (errors, sizes)
    # Second order: halving h divides the error by ~4.
    for a, b in zip(errors, errors[1:]):
        assert 3.5 < a / b < 4.5, errors


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_linear_omits_only_the_scale_change(norm):
    """d/dh exact(h delta) at 0 = linear(delta) - ((xhat . dc) / d_model) * (xhat / scale) * w @ W.

    ``xhat = c / scale`` with ``c`` the corrupted residual (centred for LN), ``dc`` delta (centred
    for LN). The derivative is autograd's, so this pins what the linear mode is: the change with
    the norm's scale frozen at the corrupted run's.
    """
    delta, resid, norm_w, norm_b, W = make_inputs(ODD, norm, True, dtype=torch.float64)
    kw = dict(norm=norm, eps=EPS)
    zero = torch.zeros_like(delta)
    _, jvp = torch.autograd.functional.jvp(
        lambda d: delta_projection_reference(d, resid, norm_w, norm_b, W, mode="exact", **kw), zero, delta
    )
    linear = delta_projection_reference(delta, resid, norm_w, norm_b, W, mode="linear", **kw)
    c = resid - resid.mean(-1, keepdim=True) if norm == "LN" else resid  # [layer, batch, pos, d]
    dc = delta - delta.mean(-1, keepdim=True) if norm == "LN" else delta
    scale = torch.sqrt(c.pow(2).mean(-1, keepdim=True) + EPS)
    xhat = c / scale
    coef = torch.einsum("lbpd,sbpd->slbp", xhat, dc)[..., None] / delta.shape[-1]
    term = torch.einsum("slbpd,ldn->slbpn", coef * (xhat / scale * norm_w[:, None, None, :])[None], W)
    assert_close(jvp, linear - term, rel=1e-10)
    assert term.abs().max() > 0.05 * linear.abs().max()  # the omitted term is not negligible here
    # ... and the finite-difference error of the linear mode is then first order.
    errors, _ = _fd_errors(delta, resid, norm_w, norm_b, W, norm)
    assert 1.8 < errors[0] / errors[1] < 2.2, errors


def test_linear_ignores_ln_bias_and_delta_mean():
    delta, resid, norm_w, norm_b, W = make_inputs(ODD, "LN", True)
    kw = dict(mode="linear", norm="LN", eps=EPS)
    out = delta_projection_reference(delta, resid, norm_w, norm_b, W, **kw)
    shifted = delta + torch.randn(delta.shape[:-1] + (1,))
    assert_close(delta_projection_reference(shifted, resid, norm_w, None, W, **kw), out, rel=1e-5)


def test_reference_is_differentiable():
    delta, resid, norm_w, norm_b, W = make_inputs(ODD, "LN", True)
    delta.requires_grad_(True)
    out = delta_projection(delta, resid, norm_w, norm_b, W, mode="exact", norm="LN", eps=EPS)
    out.sum().backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


# ---- Triton kernel -------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference_dot_path(launcher, case):
    """tl.dot blocks (16, 32, 32): 2 row tiles, 2 d_model tiles, 2 n_out tiles, all ragged."""
    mode, norm, bias = case
    inputs = make_inputs(ODD_ROWS, norm, bias, device=DEVICE)
    out = nan_out(inputs[0], ODD_ROWS[1], ODD_ROWS[5])
    got = launcher(*inputs, mode=mode, norm=norm, eps=EPS, out=out, block_m=16, block_n=32, block_k=32)
    assert got is out
    ref = delta_projection_reference(*inputs, mode=mode, norm=norm, eps=EPS)
    assert_close(got, ref, rel=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=_ids)
def test_kernel_matches_reference_small_blocks(launcher, case):
    """BLOCK_M = 8 (multiply-sum instead of tl.dot) on 15 rows: 2 row tiles, 3 x 3 other tiles."""
    mode, norm, bias = case
    inputs = make_inputs(ODD, norm, bias, device=DEVICE, seed=1)
    out = nan_out(inputs[0], ODD[1], ODD[5])
    launcher(*inputs, mode=mode, norm=norm, eps=EPS, out=out, block_m=8, block_n=16, block_k=16)
    assert_close(out, delta_projection_reference(*inputs, mode=mode, norm=norm, eps=EPS), rel=1e-5)


@pytest.mark.interpreter
def test_kernel_strided_inputs_and_default_blocks(launcher):
    """Non-contiguous views (a slice of delta, a transposed W) with the launcher's own blocks."""
    S, L, B, P, D, N = ODD
    delta, resid, norm_w, norm_b, W = make_inputs(ODD, "LN", True, device=DEVICE)
    delta_big = torch.randn(S + 2, B, P, D + 3, device=DEVICE)
    delta_big[1 : S + 1, ..., :D] = delta
    W_t = W.transpose(1, 2).contiguous().transpose(1, 2)
    d_view = delta_big[1 : S + 1, ..., :D]
    assert not d_view.is_contiguous() and not W_t.is_contiguous()
    for mode in ("exact", "linear"):
        got = delta_projection(d_view, resid, norm_w, norm_b, W_t, mode=mode, norm="LN", eps=EPS, backend="triton")
        ref = delta_projection_reference(delta, resid, norm_w, norm_b, W, mode=mode, norm="LN", eps=EPS)
        assert_close(got, ref, rel=1e-5)


def test_auto_backend_on_cpu_is_the_reference():
    inputs = make_inputs(ODD, "RMS", False)
    kw = dict(mode="exact", norm="RMS", eps=EPS)
    expected = delta_projection_reference(*inputs, **kw)
    assert torch.equal(delta_projection(*inputs, **kw), expected)  # CPU tensors: reference
    assert torch.equal(delta_projection(*inputs, **kw, backend="torch"), expected)


def test_empty_sources(launcher):
    _, resid, norm_w, norm_b, W = make_inputs(ODD, "LN", True, device=DEVICE)
    delta = torch.empty(0, 3, 5, 40, device=DEVICE)
    for backend in ("torch", "triton"):
        out = delta_projection(delta, resid, norm_w, norm_b, W, mode="exact", norm="LN", eps=EPS, backend=backend)
        assert out.shape == (0, 2, 3, 5, 36)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_cuda_dtypes(launcher, dtype, rel, case):
    """On CUDA, default and small blocks, against the fp32 reference of the same (rounded) inputs."""
    mode, norm, bias = case
    for shape, blocks in (((5, 4, 3, 37, 200, 300), {}), (ODD_ROWS, dict(block_m=16, block_n=16, block_k=16))):
        inputs = make_inputs(shape, norm, bias, dtype=dtype, device="cuda")
        out = nan_out(inputs[0], shape[1], shape[5])
        launcher(*inputs, mode=mode, norm=norm, eps=EPS, out=out, **blocks)
        ref = delta_projection_reference(*[t.float() if t is not None else None for t in inputs],
                                         mode=mode, norm=norm, eps=EPS)
        assert_close(out, ref, rel=rel)
        auto = delta_projection(*inputs, mode=mode, norm=norm, eps=EPS)
        assert_close(auto, ref, rel=rel)


# ---- validation ----------------------------------------------------------------------------------


def _bad(**changes):
    delta, resid, norm_w, norm_b, W = make_inputs((2, 2, 2, 3, 8, 6), "LN", True)
    args = dict(delta=delta, resid=resid, norm_w=norm_w, norm_b=norm_b, W=W, mode="exact", norm="LN", eps=EPS)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(mode="approx"), "mode must be one of"),
        (dict(norm="LayerNorm"), "norm must be one of"),
        (dict(eps=-1.0), "eps must be a non-negative"),
        (dict(delta=torch.randn(2, 3, 8)), "delta must be 4-D"),
        (dict(W=torch.randn(2, 8, 3, 2)), "W must be 3-D"),
        (dict(delta=torch.randn(2, 2, 3, 9)), "d_model mismatch.*resid"),
        (dict(W=torch.randn(2, 9, 6)), "d_model mismatch.*W"),
        (dict(norm_w=torch.randn(2, 9)), "d_model mismatch.*norm_w"),
        (dict(norm_b=torch.randn(2, 7)), "d_model mismatch.*norm_b"),
        (dict(W=torch.randn(3, 8, 6)), "layer count mismatch.*W"),
        (dict(norm_w=torch.randn(1, 8)), "layer count mismatch.*norm_w"),
        (dict(norm_b=torch.randn(3, 8)), "layer count mismatch.*norm_b"),
        (dict(delta=torch.randn(2, 2, 4, 8)), "batch/pos mismatch"),
        (dict(delta=torch.randn(2, 1, 3, 8)), "batch/pos mismatch"),
        (dict(norm="RMS"), "norm_b must be None"),
        (dict(W=torch.randint(0, 3, (2, 8, 6))), "W must be a floating-point"),
    ],
)
def test_bad_arguments(changes, match):
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        delta_projection_reference(**args)
    with pytest.raises(ValueError, match=match):
        delta_projection(**args)


def test_bad_backend_and_out(launcher):
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_projection(**_bad(), backend="cuda")
    args = _bad()
    mode, norm, eps = args.pop("mode"), args.pop("norm"), args.pop("eps")
    with pytest.raises(ValueError, match="out must be"):
        launcher(*args.values(), mode=mode, norm=norm, eps=eps, out=torch.empty(2, 2, 2, 3, 5))
