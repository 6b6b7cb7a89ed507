"""Every TransformerLens private that fastpatch relies on, in one place.

fastpatch is a drop-in for ``transformer_lens.patching`` 4.3, so it reuses a few of
TransformerLens's own unexported helpers instead of copying them: that keeps the assembled
results (``PatchingResult`` stacking, the wrapped first sweep of the ``*_every`` helpers), the
direct path refusals and the Q/K/V fork identical to TransformerLens's. A release may move or
change any of them without notice; ``tests/test_tl_privates.py`` pins each name and the part of
its behaviour fastpatch uses, and ``pyproject.toml`` pins TransformerLens to the releases those
tests cover. Every other module imports these names from here, never from TransformerLens.
"""

from __future__ import annotations

from typing import Any

from transformer_lens.patching import (
    _BLOCK_TYPES,
    _HEAD_TYPES,
    _check_direct_path_support,
    _split_qkv_input,
    _stack_patch_types,
    _wrap_tensor_result,
)

__all__ = [
    "BLOCK_TYPES",
    "HEAD_TYPES",
    "build_bridge_from_module",
    "check_direct_path_support",
    "split_qkv_input",
    "stack_patch_types",
    "wrap_tensor_result",
]

# Patch-type names of the ``*_every`` results: ("out", "q", "k", "v", "pattern") for heads and
# ("resid_pre", "attn_out", "mlp_out") for blocks, in the order the sweeps are stacked.
HEAD_TYPES = _HEAD_TYPES
BLOCK_TYPES = _BLOCK_TYPES

# ``(tensor, axis_names) -> PatchingResult``: a tensor sweep wrapped so it stacks with typed ones.
wrap_tensor_result = _wrap_tensor_result

# ``(results, *, axis_order, n_heads, type_names)``: stack per-activation sweeps on a leading
# ``patch_type`` axis, zero-padding grouped-query K/V heads of ``PatchingResult``s.
stack_patch_types = _stack_patch_types

# ``(model, src_layers, component)``: TransformerLens's refusals for direct path patching
# (blocks without attention, source writes other than ``z @ W_O``, K/V on grouped-query models).
check_direct_path_support = _check_direct_path_support

# ``(model)``: context manager turning on the per-head pre-norm Q/K/V input hooks
# (``blocks.{l}.attn.hook_{q,k,v}_input``) and restoring the caller's flags on exit.
split_qkv_input = _split_qkv_input


def build_bridge_from_module(module: Any, architecture: str, **kwargs: Any) -> Any:
    """``TransformerBridge`` around an in-memory Hugging Face model: the only offline way to build one.

    TransformerLens keeps it in a private module (``model_bridge.sources._bridge_builder``), imported
    here on first use because loading it registers every supported architecture (seconds).
    """
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module as build

    return build(module, architecture, **kwargs)
