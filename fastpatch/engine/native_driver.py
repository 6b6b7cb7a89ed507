"""Native driver: evaluate a plan's cells on the native forward, group by group, chunk by chunk.

For each group of cells sharing a first changed position ``start``: chunks sized from the
budget and the rows' peak memory over positions ``start..``, each chunk run from its cells'
entry points (``native.backend.forward_from_entries``), then the metrics from the final
residual: only the logits they read when they all declare their reads
(``MetricSet.common_reads``: the last block runs at the span of read positions only, and each
read position is unembedded at its token columns only), else each cell's full logits. No-op
cells, and cells whose patch cannot reach any position the metrics read, get the corrupted
baseline; read positions before a patch's first change hold the corrupted logits.

Metrics that read activations get each cell's from three places: the rows the forward recomputed
(``record``), the hooks its patch changed inside the patched layer before the cell joined
(``cells.cell_resid``'s ``record``), and the corrupted trace everywhere else. Metrics that declare
they read no logits (``reads_logits = False``) cost no unembedding at all.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastpatch.engine.chunks import Chunk, ChunkBudget, make_chunks
from fastpatch.engine.metric_set import MetricSet, read_positions
from fastpatch.engine.native import backend as native_backend
from fastpatch.engine.native.cells import LayerRecord
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
    device = trace.logits.device
    # metrics that read activations: each cell's from the corrupted trace, its patched layer and the recomputed rows
    sites = {name: native_site(name, native.n_layers) for name in metrics.activation_names}
    if any(site is None for site in sites.values()):  # the plan's native_activation_reason sends these to hooks
        raise ValueError(f"the native backend does not record {[n for n, s in sites.items() if s is None]}")
    baseline = metrics.evaluate(trace.logits, {n: _trace_value(trace, *site) for n, site in sites.items()} if sites else None)
    for cell in work.no_ops:
        values[cell] = baseline
    bar.update(len(work.no_ops))
    if work.logits_of is not None and sites:
        raise ValueError("metrics that read activations need the hook backend for this plan")
    if work.logits_of is not None:  # the plan computes these cells' logits itself
        for members in work.groups.values():
            for member in members:
                values[member.cell] = metrics.evaluate(work.logits_of(member.cell))
            bar.update(len(members))
        return
    reads = metrics.common_reads()  # None: full logits; []: no metric reads the logits
    positions = None if reads is None else [_positions(r, n_pos) for r in reads]
    last_read = max(max(p) for p in positions) if positions else None
    # bytes_per_row counts one read row of logits; metrics reading whole rows at several positions need more
    full_rows = 0 if positions is None else sum(len(p) for r, p in zip(reads, positions) if r.tokens is None)
    extra_row_bytes = max(0, full_rows - 1) * 2 * int(native.W_U.shape[1]) * dtype_bytes
    # positions the last block computes: those of the logits the metrics read and, for activations read in the
    # last block (or of the final residual), the positions their metrics declare; every position when either is
    # undeclared (``None``)
    last_sites = {site for site in sites.values() if _in_last_block(site, native.n_layers)}
    act_positions = metrics.activation_positions() if last_sites else []
    span: Optional[List[int]] = None
    if positions is not None and act_positions is not None:
        span = sorted({p for ps in positions for p in ps} | set(_positions_in_range(act_positions, n_pos, "activations")))
    wanted = set(sites.values())
    workspace = native_backend.LogitsWorkspace()
    for start, members in work.groups.items():
        if not sites and last_read is not None and last_read < start:  # the metrics read nothing the patch can reach
            for member in members:
                values[member.cell] = baseline
            bar.update(len(members))
            continue
        row_bytes = native_backend.bytes_per_row(native, n_pos, start, reads is None, dtype_bytes) + extra_row_bytes
        resid_of = work.group_resid(start)
        # the last block computes the span of read positions the patch can reach, nothing else
        first_read, read = start, None
        if span and span[-1] >= start:
            first_read = max(start, span[0])
            read = slice(first_read - start, span[-1] - start + 1)

        def run(chunk: Chunk, start=start, members=members, resid_of=resid_of, read=read, first_read=first_read) -> None:
            recorded: Dict[Tuple[int, str], Tensor] = {}  # the forward's rows at each site
            in_layer: Dict[int, Dict[Tuple[int, str], Tensor]] = defaultdict(dict)  # each cell's patched layer

            def keeper(store: Dict[Tuple[int, str], Tensor]) -> LayerRecord:
                """A ``record`` that keeps the wanted sites' values in ``store``."""

                def keep(layer: int, kind: str, value: Tensor) -> None:
                    if (layer, kind) in wanted:
                        store[(layer, kind)] = value

                return keep

            def resid(cell: int) -> Tensor:
                return resid_of(cell, keeper(in_layer[cell]))

            x, order = native_backend.forward_from_entries(
                native, trace, start, members[chunk.start : chunk.stop], resid if sites else resid_of, read,
                keeper(recorded) if sites else None,
            )

            def acts(i: int, cell: int) -> Optional[Dict[str, Tensor]]:
                if not sites:
                    return None
                return {n: _cell_value(trace, site, recorded, in_layer.get(cell, {}), i, batch, start,
                                       first_read if site in last_sites else start) for n, site in sites.items()}

            if reads is None:
                for i, (cell, logits) in enumerate(zip(order, native_backend.cell_logits(native, trace, x, start, workspace))):
                    values[cell] = metrics.evaluate(logits, acts(i, cell))
            else:
                selections = [_selected(native, trace, x, r, p, start, first_read, len(order)) for r, p in zip(reads, positions)]
                for i, cell in enumerate(order):
                    values[cell] = metrics.evaluate_selected([sel[i * batch : (i + 1) * batch] for sel in selections],
                                                             acts(i, cell), device)
            bar.update(len(order))

        run_with_oom_retry(make_chunks(len(members), budget.cells_per_chunk(row_bytes, batch)), run)


def _positions(reads: Any, n_pos: int) -> List[int]:
    """A declared read's positions counted from 0, checked against the run's ``n_pos`` positions."""
    return _positions_in_range(read_positions(reads), n_pos, "logits")


def _positions_in_range(positions: Sequence[int], n_pos: int, what: str) -> List[int]:
    out = []
    for position in positions:
        if not -n_pos <= position < n_pos:
            raise ValueError(f"a metric reads {what} at position {position}, out of range for {n_pos} positions")
        out.append(position % n_pos)
    return out


def _in_last_block(site: Tuple[int, str], n_layers: int) -> bool:
    """Whether the last block computes ``site`` at its read positions only (all but its input, ``resid_pre``)."""
    layer, kind = site
    return layer == n_layers or (layer == n_layers - 1 and kind != "resid_pre")


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


# ---- activations a metric reads, as the native forward provides them ---------------------------
_BLOCK_HOOK = re.compile(
    r"blocks\.(\d+)\.(?:hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)|attn\.hook_(pattern|z)|mlp\.hook_(post))"
)


def native_site(name: str, n_layers: int) -> Optional[Tuple[int, str]]:
    """``(layer, kind)`` of a hook the native forward records (``forward_from_entries``' ``record``), else ``None``."""
    if name == "ln_final.hook_in":
        return (n_layers, "final")
    match = _BLOCK_HOOK.fullmatch(name)
    if match is None or int(match.group(1)) >= n_layers:
        return None
    return (int(match.group(1)), match.group(2) or match.group(3) or match.group(4))


def _trace_value(trace: Any, layer: int, kind: str) -> Tensor:
    """The corrupted run's activation at a native site (the model's own cached numbers)."""
    if kind == "final" or (kind == "resid_post" and layer + 1 == len(trace.resid_pre)):
        return trace.resid_final
    if kind == "resid_post":
        return trace.resid_pre[layer + 1]
    value = getattr(trace, kind)[layer]
    if value is None:  # mlp.hook_post of a mixture of experts: native_activation_reason refuses it
        raise ValueError(f"the native backend has no {kind} in layer {layer}")
    return value


def _cell_value(
    trace: Any, site: Tuple[int, str], recorded: Dict[Tuple[int, str], Tensor], in_layer: Dict[Tuple[int, str], Tensor],
    i: int, batch: int, start: int, first: int,
) -> Tensor:
    """Row block ``i``'s activation at ``site``: the corrupted run's, with positions ``start..`` replaced by the
    recomputed rows where the cell had joined the forward there (which begin at position ``first``: in the last
    block, the first position it computed; positions from ``start`` it did not compute are NaN), else by what its
    patch computed in the patched layer (``in_layer``: the cell's own rows of hooks before its entry); anywhere
    else nothing differs."""
    value = _trace_value(trace, *site)
    rows = recorded.get(site)
    if rows is not None and (i + 1) * batch <= rows.shape[0]:
        block = rows[i * batch : (i + 1) * batch]
    elif site in in_layer:
        block, first = in_layer[site], start
    else:
        return value
    out = value.clone()
    dest = out if site[1] != "pattern" else out.transpose(1, 2)  # pattern [batch, head, dest, src]: destinations
    block = block if site[1] != "pattern" else block.transpose(1, 2)
    if first > start or first + block.shape[1] < dest.shape[1]:
        dest[:, start:] = float("nan")  # positions the last block did not compute: no metric declared it reads them
    dest[:, first : first + block.shape[1]] = block
    return out
