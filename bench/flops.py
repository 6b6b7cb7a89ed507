"""The FLOPs a sweep cannot avoid: the sum over cells of the compute after each cell's entry.

For each cell (see ``fastpatch/engine/native/cells.py``): every block from its entry block on,
over positions ``start..pos-1`` only, attending over the keys up to each position; then the
final unembedding of what the metric reads (the full ``[pos - start, d_vocab]`` logits for a
plain callable, one position's named columns or full row for a ``fastpatch.metrics`` metric).
No-op cells cost nothing. A multiply-add counts as 2 FLOPs; norms, softmax and the few FLOPs of
recomputing one head are left out, so this is a lower bound of the work done.

The cells, their first changed positions and entry points come from the engine itself (the
same grouping the native backend runs), so the count follows the engine's skipping rules.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

from fastpatch import patching as fp
from fastpatch.engine import sweep_groups
from fastpatch.engine.metric_set import MetricSet
from fastpatch.engine.native import NativeModel
from fastpatch.engine.native.backend import group_cells
from fastpatch.engine.native.cells import ATTN
from fastpatch.engine.plan import Sweep, cell_locations, index_table
from fastpatch.engine.probing import clean_activations_for

# The sweeps each ``*_every`` helper runs in one plan: the engine's own groups (``get_act_patch_<name>``).
EVERY_PARTS = {
    "get_act_patch_attn_head_all_pos_every": sweep_groups.HEAD_ALL_POS,
    "get_act_patch_attn_head_by_pos_every": sweep_groups.HEAD_BY_POS,
    "get_act_patch_block_every": sweep_groups.BLOCK,
}


def _attention_flops(native: NativeModel, d_model: int, start: int, n_pos: int) -> int:
    heads_dims = native.n_heads * native.d_head
    projections = 2 * d_model * (native.n_heads + 2 * native.n_kv_heads) * native.d_head + 2 * heads_dims * d_model
    keys = sum(p + 1 for p in range(start, n_pos))  # causal: position p attends over p + 1 keys
    return projections * (n_pos - start) + 2 * 2 * heads_dims * keys


def _mlp_flops(native: NativeModel, d_model: int, d_mlp: int, n_tokens: int) -> int:
    moe = native.layers[0].moe
    if moe is not None:  # the router, then top_k gated experts per token
        return (2 * d_model * moe.router.shape[1] + 2 * d_model * d_mlp * 3 * moe.top_k) * n_tokens
    return 2 * d_model * d_mlp * (3 if native.gated else 2) * n_tokens


def lower_bound_flops(model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, sweeps: List[Sweep], metric: Any) -> int:
    """Lower-bound FLOPs of running ``sweeps`` with ``metric`` (a callable or mapping)."""
    native, trace = NativeModel.checked(model, corrupted_tokens)
    metrics = MetricSet(metric, "scalar", int(corrupted_tokens.shape[0]))
    reads: Optional[list] = metrics.common_reads()
    batch, n_pos = corrupted_tokens.shape
    d_model, d_mlp, d_vocab = native.d_model, native.d_mlp, native.W_U.shape[1]
    clean = clean_activations_for(model, corrupted_tokens, clean_cache, sweeps)
    groups, _ = group_cells(native, trace, sweeps, cell_locations(sweeps), clean)
    total = 0
    for start, cells in groups.items():
        n_tokens = n_pos - start
        attn, mlp = _attention_flops(native, d_model, start, n_pos), _mlp_flops(native, d_model, d_mlp, n_tokens)
        if reads is None:
            unembed = 2 * d_model * d_vocab * n_tokens
        else:
            columns = sum(d_vocab if r.tokens is None else r.tokens.shape[1] for r in reads)
            unembed = 2 * d_model * columns
        for cell in cells:
            blocks = native.n_layers - cell.block
            cost = blocks * mlp + max(0, blocks - (0 if cell.stage == ATTN else 1)) * attn
            total += batch * (cost + unembed)
    return int(total)


def sweep_lower_bound_flops(
    sweep_fn: Callable, model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any
) -> int:
    """``lower_bound_flops`` of one ``fastpatch.patching`` sweep function (``get_act_patch_*``,
    including the ``*_every`` helpers, which run several sweeps in one plan)."""
    names: Sequence[str] = EVERY_PARTS.get(getattr(sweep_fn, "__name__", ""), ())
    parts = [getattr(fp, f"get_act_patch_{name}") for name in names] or [sweep_fn]
    sweeps = []
    for part in parts:
        name = part.keywords["activation_name"]
        index_df, _ = index_table(model, corrupted_tokens.shape[-1], name, part.keywords["index_axis_names"], None)
        sweeps.append(Sweep(name, part.keywords["patch_setter"], index_df))
    return lower_bound_flops(model, corrupted_tokens, clean_cache, sweeps, metric)
