"""Run a plan's cells on the native forward with exact compute skipping.

Cells are grouped by ``start`` (first changed position: every row of a batched pass shares its
positions) and sorted by entry block. In each chunk the layer loop starts at the earliest entry
and rows are concatenated onto the running batch as the loop reaches their entry, so no row
computes a block before its patch and every block runs as one batched matmul. Attention reads
the corrupted run's keys and values for positions before ``start``. With metrics that declare
what they read (``fastpatch.metrics``), only the read position is normalised and unembedded,
and only the read vocabulary columns when they name them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastpatch.engine.native.cells import (
    ATTN,
    MLP,
    LayerRecord,
    NativeCell,
    cell_resid,
    changed_positions,
    entry_point,
    first_changed_positions,
)
from fastpatch.engine.native.model import NativeModel, Trace
from fastpatch.engine.plan import CellLocation, Sweep


class NativeGroups(NamedTuple):
    """Cells by first changed position (each group sorted by entry), and the cells that change nothing."""

    groups: Dict[int, List[NativeCell]]
    no_ops: List[int]


def bytes_per_row(native: NativeModel, n_pos: int, start: int, full_logits: bool, dtype_bytes: int) -> int:
    """Peak memory of one row of a pass over positions ``start..``: a forward over ``n_pos - start``
    query positions attending over ``n_pos`` keys, plus the full logits only when a metric needs them."""
    moe = native.layers[0].moe
    d_model, d_mlp = native.d_model, native.d_mlp * (moe.top_k if moe is not None else 1)  # experts: top_k MLPs a token
    n, d_vocab = n_pos - start, native.W_U.shape[1]
    per_pos = 10 * d_model + 3 * d_mlp + 3 * native.n_heads * n_pos + 4 * native.n_heads * native.d_head
    logits = 2 * n_pos * d_vocab if full_logits else 2 * d_vocab
    return int((per_pos * n + logits) * dtype_bytes)


def group_by_start(starts: Sequence[Optional[int]], entries: Sequence[Tuple[int, int]]) -> NativeGroups:
    """Cells by first changed position ``starts[cell]`` (``None``: a no-op), each group sorted by
    entry ``(block, stage)``; Python's stable sort keeps the caller's order among equal entries."""
    groups: Dict[int, List[NativeCell]] = defaultdict(list)
    no_ops = []
    for cell, (start, entry) in enumerate(zip(starts, entries)):
        if start is None:
            no_ops.append(cell)
        else:
            groups[start].append(NativeCell(cell, *entry))
    for members in groups.values():
        members.sort(key=lambda c: (c.block, c.stage))
    return NativeGroups(dict(sorted(groups.items())), no_ops)


def group_cells(
    native: NativeModel, trace: Trace, sweeps: List[Sweep], locations: Sequence[CellLocation], clean: Mapping[str, Tensor]
) -> NativeGroups:
    """An activation plan's cells by first changed position, each group sorted by entry; and the no-op cells."""
    if not locations:
        return NativeGroups({}, [])
    cells = [(sweeps[loc.sweep], sweeps[loc.sweep].indices[loc.row].tolist()) for loc in locations]
    changed = torch.stack([changed_positions(native, trace, sweep.activation_name, index, sweep.patch_setter,
                                             clean[sweep.hook_name(index[0])]) for sweep, index in cells])
    entries = [entry_point(native, sweep.activation_name, index[0]) for sweep, index in cells]
    return group_by_start(first_changed_positions(changed), entries)


def sweep_resid(
    native: NativeModel, trace: Trace, sweeps: List[Sweep], locations: Sequence[CellLocation], clean: Mapping[str, Tensor],
    start: int,
) -> Callable[..., Tensor]:
    """``(cell, record=None) -> [batch, pos - start, d_model]`` entry residual of an activation plan's cells;
    ``record`` receives the hooks of the patched layer the patch changes before the entry (``cell_resid``)."""

    def resid(cell: int, record: LayerRecord = None) -> Tensor:
        sweep = sweeps[locations[cell].sweep]
        index = sweep.indices[locations[cell].row].tolist()
        clean_act = clean[sweep.hook_name(index[0])]
        return cell_resid(native, trace, sweep.activation_name, index, sweep.patch_setter, clean_act, start, record)

    return resid


def forward_from_entries(
    native: NativeModel,
    trace: Trace,
    start: int,
    cells: Sequence[NativeCell],
    resid_of: Callable[[int], Tensor],
    read_index: Optional[Union[int, slice]] = None,
    record: LayerRecord = None,
) -> Tuple[Tensor, List[int]]:
    """Run a chunk of cells sharing ``start`` from their entry points to the final residual.

    Returns that residual and the cell numbers in row order (``batch`` rows each).
    ``resid_of(cell)`` gives a cell's entry residual ``[batch, pos - start, d_model]``.

    The residual is ``[rows, pos - start, d_model]``; with ``read_index`` (the one position a
    metric reads, counted from ``start``) the last block computes its queries, attention output
    and MLP at that position only, and the result is ``[rows, 1, d_model]``; a slice of positions
    (counted from ``start``) likewise gives ``[rows, len(slice), d_model]``.

    ``record(layer, kind, value)``, when given, receives the rows computed so far (the first cells of
    the returned order) at positions ``start..`` (in the last block: the positions computed there):
    ``resid_pre``, ``pattern``, ``z``, ``attn_out``, ``resid_mid`` (sequential blocks), ``post``
    (``mlp.hook_post``; not for a mixture of experts), ``mlp_out``, ``resid_post`` of each layer, and
    ``final`` (layer ``n_layers``: the final norm's input), in the hook layouts. What a cell's rows hold
    before they join (the patched layer's hooks) is the entry residual's business (``cells.cell_resid``).
    """
    by_entry: Dict[Tuple[int, int], List[int]] = defaultdict(list)
    for cell, block, stage in cells:
        by_entry[(block, stage)].append(cell)
    batch = trace.resid_pre[0].shape[0]
    last = native.n_layers - 1
    order: List[int] = []

    def join(x: Optional[Tensor], key: Tuple[int, int], positions: slice) -> Optional[Tensor]:
        joining = by_entry.get(key)
        if not joining:
            return x
        order.extend(joining)
        new = torch.cat([resid_of(cell)[:, positions] for cell in joining], dim=0)
        return new if x is None else torch.cat([x, new], dim=0)

    def keep_post(layer: int) -> Optional[Callable[[Tensor], None]]:
        return None if record is None else lambda post: record(layer, "post", post)

    everything = slice(None)
    read = read_index if isinstance(read_index, slice) else everything
    if isinstance(read_index, int):
        read = slice(read_index, read_index + 1)
    x: Optional[Tensor] = None
    for l in range(min(layer for layer, _ in by_entry), native.n_layers):
        x = join(x, (l, ATTN), everything)
        queries = read if l == last else everything  # past the last block only the read position matters
        if x is not None:
            if record is not None:
                record(l, "resid_pre", x)
            L = native.layers[l]
            q, k, v = native.qkv(l, native.normalize(x, L.ln1_w, L.ln1_b))
            reps = x.shape[0] // batch
            k_all = torch.cat([trace.k_rot[l][:, :start].repeat(reps, 1, 1, 1), native.rotate_k(l, k, start)], dim=1)
            v_all = torch.cat([trace.v[l][:, :start].repeat(reps, 1, 1, 1), v], dim=1)
            q_start = start + (queries.start or 0)
            pattern, z = native.attend(native.rotate_q(l, q[:, queries], q_start), k_all, v_all, q_start, l)
            x = x[:, queries]
            attn_out = native.attn_out(l, z)
            if record is not None:
                record(l, "pattern", pattern)
                record(l, "z", z)
                record(l, "attn_out", attn_out)
            if native.parallel:
                mlp_out = native.mlp(l, x, keep_post(l))
                x = x + attn_out + mlp_out
                if record is not None:
                    record(l, "mlp_out", mlp_out)
                    record(l, "resid_post", x)
                continue
            x = x + attn_out
            if record is not None:
                record(l, "resid_mid", x)
        x = join(x, (l, MLP), queries)
        if x is not None:
            mlp_out = native.mlp(l, x, keep_post(l))
            x = x + mlp_out
            if record is not None:
                record(l, "mlp_out", mlp_out)
                record(l, "resid_post", x)
    x = join(x, (native.n_layers, ATTN), read)
    if record is not None and x is not None:
        record(native.n_layers, "final", x)
    return x, order


def read_logits(native: NativeModel, x_final: Tensor, tokens: Optional[Tensor], reps: int) -> Tensor:
    """Logits of one position's final residual ``[rows, d_model]``: ``[rows, k]`` at the token
    columns ``tokens`` (``[batch, k]``, the same for every cell), or the full row when ``None``."""
    x = native.final_norm(x_final)
    if tokens is None:
        return native.unembed(x)
    cols = tokens.to(x.device).repeat(reps, 1)  # [rows, k]
    out = torch.einsum("rd,rkd->rk", x, native.W_U.T[cols])
    return native.cap_logits(out if native.b_U is None else out + native.b_U[cols])


class LogitsWorkspace:
    """Reused output buffers for full logits: fresh multi-gigabyte tensors per chunk would be paid
    for in page faults (large CPU allocations go back to the OS when freed)."""

    def __init__(self) -> None:
        self._flat: Optional[Tensor] = None

    def suffix(self, rows: int, d_vocab: int, like: Tensor) -> Tensor:
        need = rows * d_vocab
        if self._flat is None or self._flat.numel() < need or self._flat.dtype != like.dtype or self._flat.device != like.device:
            self._flat = torch.empty(need, dtype=like.dtype, device=like.device)
        return self._flat[:need].view(rows, d_vocab)


def cell_logits(native: NativeModel, trace: Trace, x_final: Tensor, start: int, workspace: LogitsWorkspace):
    """Yield each cell's full ``[batch, pos, d_vocab]`` logits, in row order.

    Positions before ``start`` hold the corrupted logits, the same for every cell: they are
    written once into a reused buffer and only each cell's recomputed positions are copied in.
    The buffer is overwritten for the next cell, so a caller must be done with it (the metric's
    value copied out) before asking for the next.
    """
    batch = trace.logits.shape[0]
    rows, n_new = x_final.shape[:2]
    x_norm = native.final_norm(x_final).reshape(rows * n_new, -1)
    d_vocab = native.W_U.shape[1]
    suffix = workspace.suffix(rows * n_new, d_vocab, x_norm)
    if native.b_U is None:
        torch.matmul(x_norm, native.W_U, out=suffix)
    else:
        torch.addmm(native.b_U, x_norm, native.W_U, out=suffix)
    native.cap_logits(suffix)
    suffix = suffix.view(rows, n_new, d_vocab)
    buffer = torch.empty_like(trace.logits)
    buffer[:, :start] = trace.logits[:, :start]
    for i in range(rows // batch):
        buffer[:, start:] = suffix[i * batch : (i + 1) * batch]
        yield buffer
