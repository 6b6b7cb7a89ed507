"""The input norms of the supported architectures, and their linearisation (plain PyTorch).

One definition shared by the native forward, the kernel references and the tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def normalize(x: Tensor, w: Tensor, b: Optional[Tensor], norm: str, eps: float) -> Tensor:
    """LayerNorm (``norm="LN"``: centre, divide by ``sqrt(mean(x^2) + eps)``, scale, shift) or
    RMSNorm (``norm="RMS"``: divide by ``sqrt(mean(x^2) + eps)``, scale) over the last axis."""
    if norm == "RMS":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return x if b is None else x + b


def linearised_norm_delta(x: Tensor, delta: Tensor, w: Tensor, norm: str, eps: float) -> Tensor:
    """``normalize(x + delta) - normalize(x)`` with the scale frozen at ``x``'s (TransformerLens
    issue #111): ``(delta - mean(delta)) / scale(x) * w`` for LayerNorm, ``delta / scale(x) * w``
    for RMSNorm. It leaves out the change of the scale itself (first order in the part of
    ``delta`` along ``x``)."""
    if norm == "RMS":
        return delta * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    centred = x - x.mean(-1, keepdim=True)
    inv_scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return (delta - delta.mean(-1, keepdim=True)) * inv_scale * w
