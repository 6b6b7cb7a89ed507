"""Q/K/V edge scores for edge attribution: reference, chunked PyTorch path and dispatcher.

A reader is one projection ``c`` (Q, K or V) of one head ``h`` in layer ``l``, with weights
``W[l, r] = W_c[h]`` ``[d_model, d_head]``; ``grads[l, r]`` is ``d metric / d hook_c`` for that head
(``[rows, d_head]``, rows = batch * pos, before rotary), ``x[l]`` the residual at the layer's
``ln1`` input in the same run and ``norm_w[l]`` that norm's scale ``gamma``. The gradient at the
reader's own copy of the residual is the norm's vector-Jacobian product::

    u[row]     = gamma * (grads[l, r, row] @ W[l, r]^T)                         [d_model]
    G[l, r, row] = J_norm(x[l, row])^T u[row]
        LN : (u - mean(u) - xhat * mean(xhat * u)) / sigma,   xhat = (x - mean(x)) / sigma,
             sigma = sqrt(mean((x - mean(x))^2) + eps)
        RMS: (u - xhat * mean(xhat * u)) / sigma,              xhat = x / sigma,
             sigma = sqrt(mean(x^2) + eps)

and the edge score of a writer ``w`` (its residual write, clean minus corrupted,
``writers[w]`` ``[rows, d_model]``) into the reader is ``score[w, l, r] = sum_rows writers[w, row] . G[l, r, row]``.
The norm's bias does not enter (it has no Jacobian).

Since ``J`` is ``(1/sigma)(P - xhat xhat^T / d_model)`` (``P`` the centring projection for LN, the
identity for RMS) the score splits into one large contraction and two rank-one corrections that
need no ``[rows, d_model]`` vector per reader::

    U~[r, row]  = u / sigma                                                     (u scaled per row)
    score[w, r] = sum_rows ( writers[w] . U~[r]
                             - sum(writers[w]) * mean(U~[r])                    (LN only)
                             - (writers[w] . xhat) * mean(xhat * U~[r]) )

What each path materialises (``S`` writers, ``R`` readers per layer, ``M`` rows, ``D = d_model``):

- :func:`qkv_edge_scores_reference`: ``G`` of one layer, ``[R, M, D]``, explicitly, then one
  einsum. Plain and obviously correct; memory ``R * M * D`` per layer.
- ``backend="torch"``: ``U~`` for a chunk of rows at a time, ``[R, chunk, D]`` with
  ``R * chunk * D <= chunk_elements`` (default ``2**24``), plus ``[S, M]`` row sums of the writers
  per layer. Never the full ``[rows, readers, d_model]`` buffer; the FLOPs of the reference.
- ``backend="triton"`` (``csrc_triton.edge_scores``): ``U~`` only as register tiles; nothing but
  the ``[S, L, R]`` scores is written.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.ops.triton_dispatch import (
    check_backend,
    check_eps,
    check_tensor_args,
    kernel_applies,
    load_launcher,
    require_kernel,
)

__all__ = ["norm_vjp", "qkv_edge_scores", "qkv_edge_scores_reference"]

_NORMS = ("LN", "RMS")
_CHUNK_ELEMENTS = 1 << 24


def _check(writers: Tensor, grads: Tensor, W: Tensor, x: Tensor, norm_w: Tensor, norm: str, eps: float) -> None:
    """Raise ``ValueError`` with a clear message unless the arguments fit the signature."""
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    check_eps(eps)
    named = [("writers", writers, 3, "[writer, row, d_model]"), ("grads", grads, 4, "[layer, reader, row, d_head]"),
             ("W", W, 4, "[layer, reader, d_model, d_head]"), ("x", x, 3, "[layer, row, d_model]"),
             ("norm_w", norm_w, 2, "[layer, d_model]")]
    check_tensor_args(named)
    S, M, D = writers.shape
    L, R, _, E = grads.shape
    expect = {"grads": (L, R, M, E), "W": (L, R, D, E), "x": (L, M, D), "norm_w": (L, D)}
    for name, t, _, layout in named[1:]:
        if tuple(t.shape) != expect[name]:
            raise ValueError(
                f"{name} must be {layout} = {expect[name]} for writers {tuple(writers.shape)} and grads "
                f"{tuple(grads.shape)}, got {tuple(t.shape)}"
            )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # fp32 math; fp64 inputs stay fp64 (upcast only).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def norm_vjp(
    x: Float[Tensor, "... d_model"], u: Float[Tensor, "... d_model"], norm: str, eps: float
) -> Float[Tensor, "... d_model"]:
    """``J(x)^T u`` for the unscaled norm ``x -> xhat`` (``fastpatch.ops.norms.normalize`` without
    weight and bias): LN ``(u - mean(u) - xhat mean(xhat u)) / sigma``, RMS ``(u - xhat mean(xhat u)) / sigma``.
    Multiply ``u`` by the norm's weight first to get the VJP of the full norm."""
    c = x - x.mean(-1, keepdim=True) if norm == "LN" else x
    rstd = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    xhat = c * rstd
    if norm == "LN":
        u = u - u.mean(-1, keepdim=True)  # mean(xhat) = 0, so mean(xhat * u) is unchanged
    return (u - xhat * (xhat * u).mean(-1, keepdim=True)) * rstd


def _reference(writers: Tensor, grads: Tensor, W: Tensor, x: Tensor, norm_w: Tensor, norm: str, eps: float) -> Tensor:
    ct = _compute_dtype(writers, grads, W, x, norm_w)
    S, L, R = writers.shape[0], grads.shape[0], grads.shape[1]
    d = writers.to(ct)
    out = torch.empty((S, L, R), device=writers.device, dtype=ct)
    for l in range(L):
        u = torch.einsum("rme,rde->rmd", grads[l].to(ct), W[l].to(ct)) * norm_w[l].to(ct)  # [R, M, D]
        G = norm_vjp(x[l].to(ct)[None], u, norm, eps)
        out[:, l] = torch.einsum("smd,rmd->sr", d, G)
    return out


def _torch_chunked(
    writers: Tensor, grads: Tensor, W: Tensor, x: Tensor, norm_w: Tensor, norm: str, eps: float, chunk_elements: int
) -> Tensor:
    """The split form of the module docstring, ``U~`` for ``chunk`` rows at a time."""
    ct = _compute_dtype(writers, grads, W, x, norm_w)
    S, M, D = writers.shape
    L, R = grads.shape[:2]
    d = writers.to(ct)
    out = torch.zeros((S, L, R), device=writers.device, dtype=ct)
    chunk = max(1, min(M, chunk_elements // max(1, R * D)))
    for l in range(L):
        xl = x[l].to(ct)
        c = xl - xl.mean(-1, keepdim=True) if norm == "LN" else xl
        rstd = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)  # [M, 1]
        xhat = c * rstd
        s_xhat = torch.einsum("smd,md->sm", d, xhat)  # writers . xhat per row, [S, M]
        s_sum = d.sum(-1) if norm == "LN" else None
        gamma, Wl = norm_w[l].to(ct), W[l].to(ct)
        for m0 in range(0, M, chunk):
            rows = slice(m0, min(M, m0 + chunk))
            u = torch.einsum("rme,rde->rmd", grads[l, :, rows].to(ct), Wl) * (gamma * rstd[rows])  # U~, [R, m, D]
            acc = d[:, rows].reshape(S, -1) @ u.reshape(R, -1).T
            acc -= s_xhat[:, rows] @ (u * xhat[rows]).mean(-1).T
            if s_sum is not None:
                acc -= s_sum[:, rows] @ u.mean(-1).T
            out[:, l] += acc
    return out


def qkv_edge_scores_reference(
    writers: Float[Tensor, "writer row d_model"],
    grads: Float[Tensor, "layer reader row d_head"],
    W: Float[Tensor, "layer reader d_model d_head"],
    x: Float[Tensor, "layer row d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    *,
    norm: str,
    eps: float,
) -> Float[Tensor, "writer layer reader"]:
    """Every writer's score into every Q/K/V reader, in plain PyTorch (see the module docstring).

    Args:
        writers: the writers' residual writes, clean minus corrupted, ``[writer, row, d_model]``.
        grads: ``d metric / d hook_{q,k,v}`` per reader (one head's projection), ``[layer, reader,
            row, d_head]``.
        W: the readers' projection weights, ``[layer, reader, d_model, d_head]``.
        x: each layer's residual at its ``ln1`` input (the norm's linearisation point), ``[layer,
            row, d_model]``.
        norm_w: each layer's ``ln1`` weight (``1 + w`` for offset conventions), ``[layer, d_model]``.
        norm: ``"LN"`` or ``"RMS"``.
        eps: the norm's epsilon.

    Returns:
        ``[writer, layer, reader]`` in fp32 (fp64 if an input is fp64). Materialises each layer's
        reader input gradients ``[reader, row, d_model]`` one layer at a time.
    """
    _check(writers, grads, W, x, norm_w, norm, eps)
    return _reference(writers, grads, W, x, norm_w, norm, eps)


def qkv_edge_scores(
    writers: Float[Tensor, "writer row d_model"],
    grads: Float[Tensor, "layer reader row d_head"],
    W: Float[Tensor, "layer reader d_model d_head"],
    x: Float[Tensor, "layer row d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    *,
    norm: str,
    eps: float,
    backend: str = "auto",
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> Float[Tensor, "writer layer reader"]:
    """``qkv_edge_scores_reference``'s result without its ``[reader, row, d_model]`` buffer.

    ``backend``: ``"auto"`` runs the fused Triton kernel (``csrc_triton.edge_scores``) on CUDA
    writers of dtype fp16/bf16 when Triton is importable, and the chunked PyTorch path otherwise
    (fp32 included: there the chunked path is predicted faster, see the comment below);
    ``"torch"`` forces the chunked PyTorch path (``U~`` for at most ``chunk_elements``
    reader-row-feature elements at a time, fp32 math); ``"triton"`` forces the kernel (on CPU
    tensors it needs ``TRITON_INTERPRET=1`` set before Triton was imported). Neither path is
    differentiable (they are called on detached gradients). Returns fp32 (fp64 on the torch path
    for fp64 inputs); the kernel accumulates in fp32, multiplying bf16/fp16 inputs in their dtype.
    """
    check_backend(backend)
    _check(writers, grads, W, x, norm_w, norm, eps)
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
    tensors = (writers, grads, W, x, norm_w)
    if backend == "auto":
        # In fp32 the kernel's dots run on FMA units, where rebuilding U~ once per writer block
        # (cdiv(S, 16) times) costs more than the chunked path's single pass: the static roofline
        # (bench/kernel_resources.py) predicts it about 5x slower at LLaMA shapes on an H100, and
        # about 5x faster than the chunked path in bf16/fp16, where its dots use tensor cores.
        use_kernel = kernel_applies(tensors, _triton_launcher()) and writers.dtype != torch.float32
        backend = "triton" if use_kernel else "torch"
    if backend == "torch":
        return _torch_chunked(writers, grads, W, x, norm_w, norm, eps, chunk_elements)

    launcher = require_kernel(tensors, _triton_launcher())
    return launcher(writers, grads, W, x, norm_w, norm=norm, eps=eps)


def _triton_launcher():
    """The kernel's launcher, or None where Triton cannot be imported (imported on first use)."""
    return load_launcher("edge_scores", "qkv_edge_scores_triton")
