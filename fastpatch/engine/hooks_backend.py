"""Hook backend of activation plans: a chunk of cells in one ``run_with_hooks`` pass, stacked along the batch.

Rows ``[c * batch, (c + 1) * batch)`` of the forward belong to the chunk's cell ``c``. For every
hook point the chunk's cells touch, one hook clones the activation (as TransformerLens does
before patching an activation that needs gradients) and writes each cell's patch into its own
row block. Works with any TransformerLens model; it is the reference the native backend is
checked against.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from fastpatch.engine.plan import CellLocation, Sweep
from fastpatch.engine.setters import apply_batched, apply_per_cell


class _HookWork(NamedTuple):
    """For one sweep, which cells patch a hook point: (chunk-local row block, row of the sweep)."""

    sweep: Sweep
    cells: List[Tuple[int, int]]


# A cell's patches: one sweep row, or several at once (a cell that patches several slices together).
CellPatches = Union[CellLocation, Sequence[CellLocation]]


def _group_by_hook(sweeps: List[Sweep], locations: Sequence[CellPatches]) -> Dict[str, List[_HookWork]]:
    grouped: Dict[str, Dict[int, List[Tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for local, cell in enumerate(locations):
        for loc in [cell] if isinstance(cell, CellLocation) else cell:
            sweep = sweeps[loc.sweep]
            grouped[sweep.hook_name(sweep.indices[loc.row, 0])][loc.sweep].append((local, loc.row))
    return {name: [_HookWork(sweeps[n], cells) for n, cells in by_sweep.items()] for name, by_sweep in grouped.items()}


class _SweepPatch(NamedTuple):
    """One sweep's patches at a hook point: batched (``cell_rows``, ``indices``) or, for a caller's
    own setter, ``per_cell`` (row block, index) pairs."""

    sweep: Sweep
    cell_rows: Optional[torch.Tensor]
    indices: Optional[torch.Tensor]
    per_cell: Optional[List[Tuple[int, list]]]


def _make_hook(work: List[_HookWork], clean: torch.Tensor, n_cells: int, batch: int) -> Callable:
    device = clean.device
    prepared = []
    for sweep, cells in work:
        locals_, rows = zip(*cells)
        if sweep.axes is not None:
            cell_rows = torch.tensor(locals_, dtype=torch.long, device=device)
            indices = torch.as_tensor(sweep.indices[list(rows), 1:], device=device)
            prepared.append(_SweepPatch(sweep, cell_rows, indices, None))
        else:
            per_cell = [(local, sweep.indices[row].tolist()) for local, row in cells]
            prepared.append(_SweepPatch(sweep, None, None, per_cell))

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        patched = activation.clone()
        view = patched.view(n_cells, batch, *patched.shape[1:])
        for sweep, cell_rows, indices, per_cell in prepared:
            if per_cell is None:
                apply_batched(view, sweep.axes, cell_rows, indices, clean)
            else:
                apply_per_cell(view, sweep.patch_setter, per_cell, clean)
        return patched

    return hook


def patched_logits(
    model: Any,
    tokens: torch.Tensor,
    sweeps: List[Sweep],
    locations: Sequence[CellPatches],
    clean_activations: Mapping[str, torch.Tensor],
    capture: Sequence[Tuple[str, Callable]] = (),
) -> torch.Tensor:
    """Logits ``[len(locations) * batch, pos, d_vocab]`` of one forward with each cell's patch (or
    patches: all of them write the clean values into the cell's rows) in its own rows."""
    batch = tokens.shape[0]
    n_cells = len(locations)
    hooks = [
        (name, _make_hook(work, clean_activations[name], n_cells, batch))
        for name, work in _group_by_hook(sweeps, locations).items()
    ]
    stacked = tokens.repeat(n_cells, 1)
    # ``capture`` (hooks that read activations for the metrics) after the patches, so they see patched values
    return model.run_with_hooks(stacked, fwd_hooks=hooks + list(capture))
