"""The sweep groups that the ``*_every`` functions run together, and how their results stack.

Shared by ``fastpatch.patching`` (``get_act_patch_*_every``: exact values) and
``fastpatch.attribution`` (``get_attr_patch_*_every``: their estimates), so that both stack the
same sweeps, in TransformerLens's order, into TransformerLens's layout. Sweeps are named by the
suffix of ``get_act_patch_<name>``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["HEAD_ALL_POS", "HEAD_BY_POS", "BLOCK", "pad_heads", "stack_head_sweeps"]

# TransformerLens's patch-type order (``_HEAD_TYPES``: output, query, key, value, pattern)
HEAD_ALL_POS = (
    "attn_head_out_all_pos",
    "attn_head_q_all_pos",
    "attn_head_k_all_pos",
    "attn_head_v_all_pos",
    "attn_head_pattern_all_pos",
)
HEAD_BY_POS = (
    "attn_head_out_by_pos",
    "attn_head_q_by_pos",
    "attn_head_k_by_pos",
    "attn_head_v_by_pos",
    "attn_head_pattern_by_pos",
)
BLOCK = ("resid_pre", "attn_out", "mlp_out")  # ``_BLOCK_TYPES``


def pad_heads(values: Float[Tensor, "... kv_head"], n_heads: int) -> Float[Tensor, "... head"]:
    """Zero-pad a grouped-query K/V sweep's head axis (the last) to ``n_heads``, as TransformerLens does."""
    return torch.nn.functional.pad(values, (0, n_heads - values.size(-1)))


def stack_head_sweeps(parts: Sequence[Tensor], n_heads: int, *, by_pos: bool, dim: int = 0) -> Tensor:
    """Stack the results of :data:`HEAD_ALL_POS` or :data:`HEAD_BY_POS` (in that order) along ``dim``.

    All positions: each part ``[..., layer, head]`` -> ``[..., 5, layer, head]`` (``dim`` is where
    the 5 goes; leading axes such as a batch stay in front). By position: parts ``[..., layer, pos,
    head]``, except the pattern's ``[..., layer, head, dest_pos]``, which is transposed to
    ``[..., layer, pos, head]``. K and V of grouped-query models are zero-padded to ``n_heads``.
    """
    out, q, k, v, pattern = parts
    if by_pos:
        pattern = pattern.transpose(-1, -2)
    return torch.stack([out, q, pad_heads(k, n_heads), pad_heads(v, n_heads), pattern], dim=dim)
