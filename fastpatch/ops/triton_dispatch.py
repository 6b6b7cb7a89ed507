"""What every op's dispatcher does before handing tensors to a Triton kernel.

Kernels live in ``csrc_triton`` and are imported on first use, so that importing fastpatch never
needs Triton (and ``TRITON_INTERPRET=1`` can still be set by a test before the first import).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Every op's ``backend`` argument: ``"auto"`` (the kernel where it applies), ``"torch"`` (the
#: plain-PyTorch path) or ``"triton"`` (the kernel, or a clear error why it cannot run).
BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def check_tensor_args(named: Sequence[Tuple[str, Any, int, str]]) -> None:
    """Each ``(name, tensor, ndim, layout)`` is a floating-point tensor of that rank on the first
    one's device, else a ``ValueError`` naming it and the layout it should have."""
    first_name, first = named[0][0], named[0][1]
    for name, t, ndim, layout in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def load_launcher(module: str, name: str) -> Optional[Callable]:
    """``csrc_triton.<module>.<name>``, or ``None`` where Triton cannot be imported."""
    try:
        return getattr(importlib.import_module(f"csrc_triton.{module}"), name)
    except ImportError:
        return None


def kernel_applies(tensors: Sequence[torch.Tensor], launcher: Optional[Callable]) -> bool:
    """``backend="auto"``: the kernel runs where the data is on CUDA in a kernel dtype."""
    return tensors[0].is_cuda and all(t.dtype in KERNEL_DTYPES for t in tensors) and launcher is not None


def require_kernel(tensors: Sequence[torch.Tensor], launcher: Optional[Callable]) -> Callable:
    """The launcher for ``backend="triton"``, or a clear error why it cannot run these tensors."""
    if launcher is None:
        raise RuntimeError("backend='triton' needs the triton package, which could not be imported")
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend='triton' supports {KERNEL_DTYPES}, got {t.dtype}")
    if not tensors[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return launcher
