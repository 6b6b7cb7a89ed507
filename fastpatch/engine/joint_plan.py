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

from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
from torch import Tensor
from transformer_lens import patching as _tl

from fastpatch.engine import hooks_backend
from fastpatch.engine.checks import check_index_df
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.plan import CellLocation, NativeWork, PatchPlan, Sweep, axis_limits
from fastpatch.engine.probing import clean_activations_for

JointCell = Tuple[CellLocation, ...]

# (activation name, number of index entries) -> (setter, index axis names) of TransformerLens's sweeps
_SLICE_SETTERS: dict = {}
for _name in _tl.__all__ if hasattr(_tl, "__all__") else dir(_tl):
    _fn = getattr(_tl, _name, None)
    if _name.startswith("get_act_patch_") and isinstance(_fn, partial) and "patch_setter" in _fn.keywords:
        _kw = _fn.keywords
        for _act in (_kw["activation_name"], "attn_scores") if _kw["activation_name"] == "pattern" else (_kw["activation_name"],):
            _SLICE_SETTERS[(_act, len(_kw["index_axis_names"]))] = (_kw["patch_setter"], tuple(_kw["index_axis_names"]))

PatchSetter = Callable[[Tensor, Sequence[int], Tensor], Tensor]
# (activation_name, index) or (activation_name, index, patch_setter), as get_act_patch_together takes it
JointPatch = Union[Tuple[str, Sequence[int]], Tuple[str, Sequence[int], PatchSetter]]


def joint_sweeps(
    model: Any, n_pos: int, cells: Sequence[Sequence[JointPatch]]
) -> Tuple[List[Sweep], List[Tuple[CellLocation, ...]]]:
    """One ``Sweep`` per (activation, setter, index length) holding every cell's slices of it, and
    each cell as the sweep rows it patches (checked: a known setter or the caller's own, indices within
    the activation's axes; a ``ValueError`` names the cell). Shared by ``fastpatch.patching.get_act_patch_together``
    and the patches of ``fastpatch.attribution.stop_gradient``."""
    rows: Dict[tuple, List[Tuple[int, ...]]] = {}
    located = []
    for number, cell in enumerate(cells):
        if isinstance(cell, (str, bytes)) or not isinstance(cell, Sequence) or len(cell) == 0:
            raise ValueError(f"cell {number} must be a non-empty list of (activation_name, index) patches, got {cell!r}")
        parts = []
        for patch in cell:
            if not isinstance(patch, (tuple, list)) or len(patch) not in (2, 3) or not isinstance(patch[0], str):
                raise ValueError(f"cell {number}: a patch is (activation_name, index) or (activation_name, index, setter), got {patch!r}")
            act, index = patch[0], tuple(int(i) for i in patch[1])
            if len(patch) == 3:
                setter, axes = patch[2], ("layer",) + tuple(f"index_{i}" for i in range(1, len(index)))
            elif (act, len(index)) in _SLICE_SETTERS:
                setter, axes = _SLICE_SETTERS[(act, len(index))]
            else:
                known = sorted({f"{a} with {n}" for a, n in _SLICE_SETTERS})
                raise ValueError(
                    f"cell {number}: no TransformerLens setter patches {act!r} with an index of {len(index)} entries "
                    f"(known: {known}); pass (activation_name, index, patch_setter)"
                )
            key = (act, setter, axes)
            table = rows.setdefault(key, [])
            table.append(index)
            parts.append((key, len(table) - 1))
        located.append(parts)
    keys = list(rows)
    sweeps = []
    for act, setter, axes in keys:
        df = pd.DataFrame(rows[(act, setter, axes)], columns=list(axes))
        try:
            check_index_df(df, axis_limits(model, act, n_pos))
        except ValueError as error:
            raise ValueError(f"patches of {act!r}: {error}") from None
        sweeps.append(Sweep(act, setter, df))
    return sweeps, [tuple(CellLocation(keys.index(key), row) for key, row in parts) for parts in located]


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
