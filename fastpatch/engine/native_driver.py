"""Native driver: evaluate a plan's cells on the native forward, group by group, chunk by chunk.

For each group of cells sharing a first changed position ``start``: chunks sized from the
budget and the rows' peak memory over positions ``start..``, each chunk run from its cells'
entry points (``native.backend.forward_from_entries``), then the metrics from the final
residual: only the logits they read when they all declare their reads
(``MetricSet.common_reads``: the last block runs at the span of read positions only, and each
read position is unembedded at its token columns only), else each cell's full logits. No-op
cells, and cells whose patch cannot reach any position the metrics read, get the corrupted
baseline; read positions before a patch's first change hold the corrupted logits.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import Tensor

from fastpatch.engine.chunks import Chunk, ChunkBudget, make_chunks
from fastpatch.engine.metric_set import MetricSet, read_positions
from fastpatch.engine.native import backend as native_backend
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.oom import run_with_oom_retry
from fastpatch.engine.plan import NativeWork


def run_native_cells(
    engine: NativeEngine, work: NativeWork, metrics: MetricSet, values: Tensor, budget: ChunkBudget, dtype_bytes: int,
    bar: Any,
) -> None:
    """Write every cell's ``[n_metrics, batch?]`` values into ``values[cell]``."""
    native, trace = engine
    batch, n_pos = trace.logits.shape[:2]
    baseline = metrics.evaluate(trace.logits)
    for cell in work.no_ops:
        values[cell] = baseline
    bar.update(len(work.no_ops))
    if work.logits_of is not None:  # the plan computes these cells' logits itself
        for members in work.groups.values():
            for member in members:
                values[member.cell] = metrics.evaluate(work.logits_of(member.cell))
            bar.update(len(members))
        return
    reads = metrics.common_reads()
    positions = None if reads is None else [_positions(r, n_pos) for r in reads]
    last_read = None if positions is None else max(max(p) for p in positions)
    # bytes_per_row counts one read row of logits; metrics reading whole rows at several positions need more
    full_rows = 0 if positions is None else sum(len(p) for r, p in zip(reads, positions) if r.tokens is None)
    extra_row_bytes = max(0, full_rows - 1) * 2 * int(native.W_U.shape[1]) * dtype_bytes
    workspace = native_backend.LogitsWorkspace()
    for start, members in work.groups.items():
        if last_read is not None and last_read < start:  # the metrics read no position the patch can reach
            for member in members:
                values[member.cell] = baseline
            bar.update(len(members))
            continue
        row_bytes = native_backend.bytes_per_row(native, n_pos, start, reads is None, dtype_bytes) + extra_row_bytes
        resid_of = work.group_resid(start)
        # the last block computes the span of read positions the patch can reach, nothing else
        first_read = None if positions is None else max(start, min(min(p) for p in positions))
        read = None if positions is None else slice(first_read - start, last_read - start + 1)

        def run(chunk: Chunk, start=start, members=members, resid_of=resid_of, read=read, first_read=first_read) -> None:
            x, order = native_backend.forward_from_entries(
                native, trace, start, members[chunk.start : chunk.stop], resid_of, read
            )
            if reads is None:
                for cell, logits in zip(order, native_backend.cell_logits(native, trace, x, start, workspace)):
                    values[cell] = metrics.evaluate(logits)
            else:
                selections = [_selected(native, trace, x, r, p, start, first_read, len(order)) for r, p in zip(reads, positions)]
                for i, cell in enumerate(order):
                    values[cell] = metrics.evaluate_selected([sel[i * batch : (i + 1) * batch] for sel in selections])
            bar.update(len(order))

        run_with_oom_retry(make_chunks(len(members), budget.cells_per_chunk(row_bytes, batch)), run)


def _positions(reads: Any, n_pos: int) -> List[int]:
    """A declared read's positions counted from 0, checked against the run's ``n_pos`` positions."""
    out = []
    for position in read_positions(reads):
        if not -n_pos <= position < n_pos:
            raise ValueError(f"a metric reads position {position}, out of range for {n_pos} positions")
        out.append(position % n_pos)
    return out


def _selected(
    native: Any, trace: Any, x: Tensor, reads: Any, positions: List[int], start: int, first_read: int, reps: int
) -> Tensor:
    """What ``from_selected`` takes, for every row of a chunk: ``[rows, k or d_vocab]``, or
    ``[rows, n_positions, k or d_vocab]`` for a read of several positions. ``x``: the final residual at
    positions ``first_read..``; a read position before ``start`` holds the corrupted run's logits."""
    per_position: List[Tensor] = []
    tokens: Optional[Tensor] = reads.tokens
    for p in positions:
        if p >= start:
            per_position.append(native_backend.read_logits(native, x[:, p - first_read], tokens, reps))
            continue
        row = trace.logits[:, p]
        row = row if tokens is None else row.gather(-1, tokens.to(row.device))
        per_position.append(row.repeat(reps, 1))
    if reads.position is not None:
        return per_position[0]
    return torch.stack(per_position, dim=1)
