"""Native driver: evaluate a plan's cells on the native forward, group by group, chunk by chunk.

For each group of cells sharing a first changed position ``start``: chunks sized from the
budget and the rows' peak memory over positions ``start..``, each chunk run from its cells'
entry points (``native.backend.forward_from_entries``), then the metrics from the final
residual: only the logits they read when they all declare the same read position
(``MetricSet.common_reads``), else each cell's full logits. No-op cells, and cells whose
patch cannot reach the position the metrics read, get the corrupted baseline.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fastpatch.engine.chunks import Chunk, ChunkBudget, make_chunks
from fastpatch.engine.metric_set import MetricSet
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
    read_pos = None if reads is None else reads[0].position % n_pos
    workspace = native_backend.LogitsWorkspace()
    for start, members in work.groups.items():
        if read_pos is not None and read_pos < start:  # the metric reads a position the patch cannot reach
            for member in members:
                values[member.cell] = baseline
            bar.update(len(members))
            continue
        row_bytes = native_backend.bytes_per_row(native, n_pos, start, reads is None, dtype_bytes)
        resid_of = work.group_resid(start)
        read_index = None if reads is None else read_pos - start

        def run(chunk: Chunk, start=start, members=members, resid_of=resid_of, read_index=read_index) -> None:
            x, order = native_backend.forward_from_entries(
                native, trace, start, members[chunk.start : chunk.stop], resid_of, read_index
            )
            if reads is None:
                for cell, logits in zip(order, native_backend.cell_logits(native, trace, x, start, workspace)):
                    values[cell] = metrics.evaluate(logits)
            else:
                selections = [native_backend.read_logits(native, x[:, 0], r.tokens, len(order)) for r in reads]
                for i, cell in enumerate(order):
                    values[cell] = metrics.evaluate_selected([sel[i * batch : (i + 1) * batch] for sel in selections])
            bar.update(len(order))

        run_with_oom_retry(make_chunks(len(members), budget.cells_per_chunk(row_bytes, batch)), run)
