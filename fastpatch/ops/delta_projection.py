"""Delta projection for direct path patching: reference and dispatching public function.

A source head's residual write ``delta[s]`` (clean minus corrupted, all positions) reaches the
Q/K/V input of a destination head in layer ``l`` through that layer's input norm and projection.
``delta_projection`` computes it for every source, destination layer and destination head at
once (``W`` is the flattened ``W_Q`` / ``W_K`` / ``W_V`` of all heads, or all three concatenated):

- ``mode="exact"``: ``normalize_l(resid[l] + delta[s]) @ W[l]``, the destination's projected input
  in the patched run (without the projection bias: the caller adds it).
- ``mode="linear"``: ``((delta[s] - mean(delta[s])) / scale_l) * w_l @ W[l]`` for LayerNorm and
  ``(delta[s] / scale_l) * w_l @ W[l]`` for RMSNorm, with ``scale_l`` the corrupted residual's
  norm scale (``sqrt(var(resid[l]) + eps)``, resp. ``sqrt(mean(resid[l]^2) + eps)``) per
  (batch, pos) row: the change with the norm's scale frozen, to add to the corrupted projection.

The normalisation is ``NativeModel.normalize``'s: LN centres, then multiplies by
``rsqrt(mean(x^2) + eps) * w`` and adds ``b``; RMS multiplies by ``rsqrt(mean(x^2) + eps) * w``.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.ops.norms import linearised_norm_delta, normalize
from fastpatch.ops.triton_dispatch import (
    check_backend,
    check_eps,
    check_tensor_args,
    kernel_applies,
    load_launcher,
    require_kernel,
)

__all__ = ["delta_projection", "delta_projection_reference"]

_MODES = ("exact", "linear")
_NORMS = ("LN", "RMS")


def _check(
    delta: Tensor,
    resid: Tensor,
    norm_w: Tensor,
    norm_b: Optional[Tensor],
    W: Tensor,
    mode: str,
    norm: str,
    eps: float,
) -> None:
    """Raise ``ValueError`` with a clear message unless the arguments fit the signature."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    check_eps(eps)
    named = [("delta", delta, 4, "[src, batch, pos, d_model]"), ("resid", resid, 4, "[layer, batch, pos, d_model]"),
             ("norm_w", norm_w, 2, "[layer, d_model]"), ("W", W, 3, "[layer, d_model, n_out]")]
    if norm_b is not None:
        if norm == "RMS":
            raise ValueError("norm_b must be None for norm='RMS' (RMSNorm has no bias)")
        named.append(("norm_b", norm_b, 2, "[layer, d_model]"))
    check_tensor_args(named)
    d_model = delta.shape[-1]
    for name, t, _, _ in named[1:]:
        dim = 1 if name == "W" else -1
        if t.shape[dim] != d_model:
            raise ValueError(
                f"d_model mismatch: delta has d_model={d_model} but {name} has {t.shape[dim]} "
                f"(shape {tuple(t.shape)})"
            )
    n_layers = resid.shape[0]
    for name, t, _, _ in named[2:]:
        if t.shape[0] != n_layers:
            raise ValueError(
                f"layer count mismatch: resid has {n_layers} layers but {name} has {t.shape[0]} "
                f"(shape {tuple(t.shape)})"
            )
    if delta.shape[1:3] != resid.shape[1:3]:
        raise ValueError(
            f"batch/pos mismatch: delta is {tuple(delta.shape)} [src, batch, pos, d_model] but resid is "
            f"{tuple(resid.shape)} [layer, batch, pos, d_model]"
        )


def _reference(
    delta: Tensor, resid: Tensor, norm_w: Tensor, norm_b: Optional[Tensor], W: Tensor, mode: str, norm: str, eps: float
) -> Tensor:
    S, B, P, _ = delta.shape
    L, N = W.shape[0], W.shape[2]
    # fp32 math; fp64 inputs stay fp64 (upcast only).
    inputs = (delta, resid, norm_w, norm_b, W)
    ct = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs) else torch.float32
    d = delta.to(ct)
    out = torch.empty((S, L, B, P, N), device=delta.device, dtype=ct)
    for l in range(L):
        w = norm_w[l].to(ct)
        r = resid[l].to(ct)  # [batch, pos, d_model]
        if mode == "exact":
            b = norm_b[l].to(ct) if (norm_b is not None and norm == "LN") else None
            a = normalize(r + d, w, b, norm, eps)  # [src, batch, pos, d_model]
        else:
            a = linearised_norm_delta(r, d, w, norm, eps)
        out[:, l] = a @ W[l].to(ct)
    return out.to(delta.dtype)


def delta_projection_reference(
    delta: Float[Tensor, "src batch pos d_model"],
    resid: Float[Tensor, "layer batch pos d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    norm_b: Optional[Float[Tensor, "layer d_model"]],
    W: Float[Tensor, "layer d_model n_out"],
    *,
    mode: str,
    norm: str,
    eps: float,
) -> Float[Tensor, "src layer batch pos n_out"]:
    """Each source's effect on every destination layer's projected (Q/K/V) input, in plain PyTorch.

    Args:
        delta: the sources' residual writes, clean minus corrupted, ``[src, batch, pos, d_model]``.
        resid: each destination layer's ``resid_pre`` in the corrupted run, ``[layer, batch, pos,
            d_model]``.
        norm_w, norm_b: the destination layers' input-norm weight and bias, ``[layer, d_model]``;
            ``norm_b`` is None for RMSNorm (and may be None for a LayerNorm without bias).
        W: the destination projections, ``[layer, d_model, n_out]`` (heads flattened into n_out).
        mode: ``"exact"`` (``normalize(resid + delta) @ W``) or ``"linear"`` (the change of the
            projected input with the norm's scale frozen at the corrupted residual's).
        norm: ``"LN"`` or ``"RMS"``.
        eps: the norm's epsilon.

    Returns:
        ``[src, layer, batch, pos, n_out]`` in ``delta``'s dtype, computed in fp32 (fp64 if an
        input is fp64) on ``delta``'s device, one destination layer at a time (memory ``src * batch * pos * d_model`` floats).
        No projection bias is added.
    """
    _check(delta, resid, norm_w, norm_b, W, mode, norm, eps)
    return _reference(delta, resid, norm_w, norm_b, W, mode, norm, eps)


def delta_projection(
    delta: Float[Tensor, "src batch pos d_model"],
    resid: Float[Tensor, "layer batch pos d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    norm_b: Optional[Float[Tensor, "layer d_model"]],
    W: Float[Tensor, "layer d_model n_out"],
    *,
    mode: str,
    norm: str,
    eps: float,
    backend: str = "auto",
) -> Float[Tensor, "src layer batch pos n_out"]:
    """``delta_projection_reference``'s result, from the fused Triton kernel where it applies.

    ``backend``: ``"auto"`` runs the Triton kernel (``csrc_triton.delta_projection``) on CUDA
    tensors of dtype fp32/fp16/bf16 when Triton is importable and no input needs a gradient, and
    the reference otherwise; ``"triton"`` forces the kernel (on CPU tensors it needs
    ``TRITON_INTERPRET=1`` set before Triton was imported); ``"torch"`` forces the reference.
    The kernel is not differentiable. On CUDA the kernel multiplies in the inputs' dtype with
    fp32 accumulation (fp32: IEEE, no TF32), so bf16/fp16 results differ from the fp32
    reference by the rounding of the normalised input to that dtype.
    """
    check_backend(backend)
    _check(delta, resid, norm_w, norm_b, W, mode, norm, eps)
    tensors = [t for t in (delta, resid, norm_w, norm_b, W) if t is not None]
    if backend == "auto":
        use_kernel = kernel_applies(tensors, _triton_launcher()) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        )
        backend = "triton" if use_kernel else "torch"
    if backend == "torch":
        return _reference(delta, resid, norm_w, norm_b, W, mode, norm, eps)

    launcher = require_kernel(tensors, _triton_launcher())
    return launcher(delta, resid, norm_w, norm_b, W, mode=mode, norm=norm, eps=eps)


def _triton_launcher():
    """The kernel's launcher, or None where Triton cannot be imported (imported on first use)."""
    return load_launcher("delta_projection", "delta_projection_triton")
