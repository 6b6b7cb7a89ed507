"""Joint plan: cells that each patch several (activation, index) slices at once ("AND" questions).

A cell is a tuple of sweep rows (``CellLocation``s): every one of them is patched into the cell's
own row block of the same batched forward, as a TransformerLens loop with one hook per slice
would patch them into one forward. The slices of all cells are grouped into one ``Sweep`` per
(activation, setter), so the clean activations are fetched and checked as for any sweep and the
hook backend writes them with the same batched setters.

The native backend enters each cell's forward at one point; a cell of several patches has several,
so this plan runs on the hook backend (``backend="auto"`` falls back, saying why).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from fastpatch.engine import hooks_backend
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.plan import CellLocation, NativeWork, PatchPlan, Sweep
from fastpatch.engine.probing import clean_activations_for

JointCell = Tuple[CellLocation, ...]


class JointPlan(PatchPlan):
    """Cells of several patches each, from ``clean_cache`` into ``tokens``' run."""

    native_unsupported = (
        "the native backend starts a cell's forward where its one patch enters; "
        "cells that patch several slices at once run on the hook backend"
    )

    def __init__(
        self, model: Any, tokens: Tensor, clean_cache: Mapping, sweeps: List[Sweep], cells: List[JointCell],
        label: str = "patching together",
    ):
        if not cells or any(len(cell) == 0 for cell in cells):
            raise ValueError("every cell must patch at least one slice")
        self.model, self.tokens, self.clean_cache, self.sweeps = model, tokens, clean_cache, sweeps
        self._cells, self.label = cells, label
        self._clean: Optional[Dict[str, Tensor]] = None

    @property
    def cells(self) -> List[JointCell]:
        return self._cells

    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        self._clean = clean_activations_for(self.model, self.tokens, self.clean_cache, self.sweeps)

    def patched_logits(self, cells: Sequence[JointCell]) -> Tensor:
        return hooks_backend.patched_logits(self.model, self.tokens, self.sweeps, cells, self._clean)

    def native_work(self, engine: NativeEngine, cells: Sequence[JointCell]) -> NativeWork:
        raise ValueError(self.native_unsupported)  # never chosen: native_unsupported sends it to hooks
