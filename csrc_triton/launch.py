"""A kernel launch as data: what a launcher decided (grid, arguments, blocks, warps, stages).

Every launcher in this package first builds a :class:`Launch` with a ``plan_<op>(...)`` function
and then calls it. The split lets ``bench/kernel_resources.py`` ask the *same* planning code which
configuration a GPU of a given architecture would run, and compile exactly that configuration
ahead of time for that architecture on a machine without a GPU (tensors on the ``meta`` device
carry the shapes, strides and dtypes the plan needs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

#: The architecture a plan assumes where the tensors are not on a CUDA device (the interpreter,
#: ``meta`` tensors without an explicit ``arch``): the oldest one the kernels are built for.
DEFAULT_ARCH = 80

#: Largest grid size on axes 1 and 2 (axis 0 allows 2**31 - 1).
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``."""

    kernel: Any  # a triton JITFunction (or the interpreter's stand-in under TRITON_INTERPRET=1)
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    arch: int  # compute capability as major * 10 + minor, e.g. 80 (A100), 90 (H100)
    notes: Dict[str, Any] = field(default_factory=dict)  # shapes the cost model needs

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def target_arch(tensor: torch.Tensor, arch: Optional[int] = None) -> int:
    """``arch`` if given, else the compute capability of ``tensor``'s CUDA device, else ``DEFAULT_ARCH``."""
    if arch is not None:
        return int(arch)
    if tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return 10 * major + minor
    return DEFAULT_ARCH


def pick_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << max(int(n) - 1, 0).bit_length()))


def check_power_of_two(**blocks: int) -> None:
    for name, value in blocks.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def output_buffer(out: Optional[torch.Tensor], shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``out`` checked to be a contiguous ``dtype`` tensor of ``shape`` on ``device``, or a new one."""
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out
