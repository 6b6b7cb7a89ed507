"""Activation plan: the cells of one or more ``get_act_patch_*`` sweeps, run together.

A cell is one row of a sweep's index table: the clean activation patched into the corrupted
run at that (layer, position, head, ...) by the sweep's patch setter. The hook backend writes
each cell's patch into its own row block (``hooks_backend``); the native backend starts each
cell where its patch first changes the residual (``native.backend``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from fastpatch.engine import hooks_backend
from fastpatch.engine.native import backend as native_backend
from fastpatch.engine.native.cells import SUPPORTED_ACTIVATIONS
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.native_driver import native_site
from fastpatch.engine.plan import CellLocation, NativeWork, PatchPlan, Sweep, cell_locations
from fastpatch.engine.probing import clean_activations_for


class ActivationPlan(PatchPlan):
    """Every cell of ``sweeps``, sweep by sweep, patched from ``clean_cache`` into ``tokens``' run."""

    def __init__(self, model: Any, tokens: Tensor, clean_cache: Mapping, sweeps: List[Sweep], label: str = "patching"):
        self.model, self.tokens, self.clean_cache, self.sweeps = model, tokens, clean_cache, sweeps
        self.label = label
        self._cells = cell_locations(sweeps)
        unsupported = sorted({sweep.activation_name for sweep in sweeps} - set(SUPPORTED_ACTIVATIONS))
        self.native_unsupported = f"the native backend does not patch {unsupported}" if unsupported else None
        self._clean: Optional[Dict[str, Tensor]] = None

    @property
    def cells(self) -> List[CellLocation]:
        return self._cells

    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        # On the native backend the parity run has fired every hook: its shapes replace the probe forward.
        hook_shapes = None if engine is None else engine.trace.hook_shapes
        self._clean = clean_activations_for(self.model, self.tokens, self.clean_cache, self.sweeps, hook_shapes)

    captures_activations = True

    def patched_logits(self, cells: Sequence[CellLocation], capture: Sequence[Tuple[str, Callable]] = ()) -> Tensor:
        return hooks_backend.patched_logits(self.model, self.tokens, self.sweeps, cells, self._clean, capture)

    def native_activation_reason(self, names: Sequence[str], n_layers: int) -> Optional[str]:
        """The native forward records the residual stream, attention patterns, z, the MLP's hidden
        activation and the block outputs of what it recomputes, the patched layer's included
        (``native.cells.cell_resid``), and takes the rest from the corrupted run; other hooks it does
        not record, nor the hidden activation of a mixture of experts (no single one)."""
        for name in names:
            site = native_site(name, n_layers)
            if site is None:
                return f"a metric reads {name}, which the native backend does not record"
            if site[1] == "post" and not hasattr(self.model.blocks[site[0]].mlp, "W_in"):
                return f"a metric reads {name}, which a mixture of experts does not have as one activation natively"
        return None

    def native_work(self, engine: NativeEngine, cells: Sequence[CellLocation]) -> NativeWork:
        native, trace = engine
        groups, no_ops = native_backend.group_cells(native, trace, self.sweeps, cells, self._clean)
        return NativeWork(
            groups, no_ops, lambda start: native_backend.sweep_resid(native, trace, self.sweeps, cells, self._clean, start)
        )

    def per_sweep(self, values: Tensor) -> List[Tensor]:
        """The plan's ``[n_cells, n_metrics, batch?]`` values split into one ``[n_metrics, n_cells, batch?]`` per sweep."""
        out, first = [], 0
        for sweep in self.sweeps:
            out.append(values[first : first + len(sweep)].movedim(0, 1))
            first += len(sweep)
        return out
