"""Hook backend: one chunk of cells in one ``run_with_hooks`` pass, stacked along the batch.

Rows ``[c * batch, (c + 1) * batch)`` of the forward belong to the chunk's cell ``c``. For every
hook point the chunk's cells touch, one hook clones the activation (as TransformerLens does
before patching an activation that needs gradients) and writes each cell's patch into its own
row block. Works with any TransformerLens model; it is the reference the native backend is
checked against.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from fastpatch.engine.plan import Chunk, Sweep
from fastpatch.engine.setters import apply_batched, apply_per_cell

# A hook's work: for one sweep, which cells (chunk-local row block, index) patch this hook point.
_HookWork = Tuple[Sweep, List[Tuple[int, int]]]


def _group_by_hook(sweeps: List[Sweep], locations: List[Tuple[int, int]], chunk: Chunk) -> Dict[str, List[_HookWork]]:
    grouped: Dict[str, Dict[int, List[Tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for local, (s, r) in enumerate(locations[chunk.start : chunk.stop]):
        sweep = sweeps[s]
        grouped[sweep.hook_name(sweep.indices[r, 0])][s].append((local, r))
    return {name: [(sweeps[s], cells) for s, cells in by_sweep.items()] for name, by_sweep in grouped.items()}


def _make_hook(work: List[_HookWork], clean: torch.Tensor, n_cells: int, batch: int) -> Callable:
    device = clean.device
    prepared = []
    for sweep, cells in work:
        locals_, rows = zip(*cells)
        if sweep.axes is not None:
            cell_rows = torch.tensor(locals_, dtype=torch.long, device=device)
            indices = torch.as_tensor(sweep.indices[list(rows), 1:], device=device)
            prepared.append((sweep, cell_rows, indices, None))
        else:
            per_cell = [(local, sweep.indices[r].tolist()) for local, r in cells]
            prepared.append((sweep, None, None, per_cell))

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


def run_chunk(
    model: Any,
    tokens: torch.Tensor,
    sweeps: List[Sweep],
    locations: List[Tuple[int, int]],
    chunk: Chunk,
    clean_activations: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Logits ``[len(chunk) * batch, pos, d_vocab]`` of the chunk's patched forward."""
    batch = tokens.shape[0]
    n_cells = len(chunk)
    hooks = [
        (name, _make_hook(work, clean_activations[name], n_cells, batch))
        for name, work in _group_by_hook(sweeps, locations, chunk).items()
    ]
    stacked = tokens.repeat(n_cells, 1)
    return model.run_with_hooks(stacked, fwd_hooks=hooks)
