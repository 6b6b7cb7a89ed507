"""The GPU cost model the benchmark scripts share: data-sheet peaks, the launch overhead, and what
counts as a kernel launch among dispatched ATen ops.

``bench/kernel_resources.py`` (the unfused references' roofline) and ``bench/launch_counts.py``
(each sweep's launches) count launches with the same rule, so their numbers compare.
"""

from __future__ import annotations

from typing import Any

# Published dense peaks (NVIDIA A100 and H100 SXM data sheets): FLOP/s and bytes/s.
PEAKS = {
    "A100-SXM4-80GB": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12, "hbm": 2.039e12},
    "H100-SXM5-80GB": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "hbm": 3.35e12},
}
LAUNCH_SECONDS = 5e-6  # per kernel launch, the usual floor on a GPU

# Ops that launch no kernel on a GPU, besides every op whose schema returns an alias (is_view).
NO_KERNEL_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "detach", "t", "transpose",
    "permute", "expand", "expand_as", "slice", "select", "unsqueeze", "squeeze", "as_strided",
    "alias", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold", "movedim",
    "lift_fresh", "lift_fresh_copy",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "is_same_size",
})


def launches_kernel(func: Any) -> bool:
    """Whether ATen op ``func`` launches a device kernel: not a view, metadata or allocation op."""
    return not (getattr(func, "is_view", False) or func.overloadpacket.__name__ in NO_KERNEL_OPS)
