"""What a batched run is made of: plans, their cells, and how each backend runs them.

A *plan* is a list of *cells*, each one patched forward whose metric values the caller wants.
Two kinds exist: an activation plan (``activation_plan``: one or more sweeps, the
``get_act_patch_*`` calls; one cell per row of a sweep's index table) and a direct path plan
(``direct_path``: one cell per (source head, reader)). The driver (``driver.run_plan``) runs
every plan the same way; a plan only says how its cells are patched, through the
:class:`PatchPlan` interface below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from transformer_lens import utilities as tl_utils
from transformer_lens.patching import make_df_from_ranges

from fastpatch.engine.checks import check_index_df
from fastpatch.engine.native.cells import NativeCell
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.setters import setter_axes


# ---- activation sweeps -------------------------------------------------------------------------
@dataclass
class Sweep:
    """One activation's sweep: every row of ``index_df`` is a cell."""

    activation_name: str
    patch_setter: Callable
    index_df: pd.DataFrame
    indices: np.ndarray = field(init=False)  # [n_cells, n_columns] int64
    axes: Optional[Tuple[int, ...]] = field(init=False)  # batched setter axes, None = per cell

    def __post_init__(self) -> None:
        self.indices = self.index_df.to_numpy(dtype=np.int64).reshape(len(self.index_df), -1)
        self.axes = setter_axes(self.patch_setter)
        if self.axes is not None and len(self.axes) != self.indices.shape[1] - 1:
            self.axes = None  # a known setter with an unexpected index table: call it as given

    def __len__(self) -> int:
        return len(self.index_df)

    def hook_name(self, layer: int) -> str:
        return tl_utils.get_act_name(self.activation_name, layer=int(layer))


class CellLocation(NamedTuple):
    """A cell of an activation plan: its sweep's number in the plan and its row in that sweep."""

    sweep: int
    row: int


def cell_locations(sweeps: List[Sweep]) -> List[CellLocation]:
    """Every cell of the plan, in run order (sweep by sweep)."""
    return [CellLocation(number, row) for number, sweep in enumerate(sweeps) for row in range(len(sweep))]


def axis_limits(model: Any, activation_name: str, n_pos: int) -> Dict[str, int]:
    """The range of every axis name TransformerLens knows (K/V heads on grouped-query models)."""
    n_heads = model.cfg.n_heads
    if activation_name in ("k", "v") and getattr(model.cfg, "n_key_value_heads", None) is not None:
        n_heads = model.cfg.n_key_value_heads
    return {
        "layer": model.cfg.n_layers,
        "pos": n_pos,
        "src_pos": n_pos,
        "dest_pos": n_pos,
        "head_index": n_heads,
        "head": n_heads,
    }


def index_table(
    model: Any,
    n_pos: int,
    activation_name: str,
    index_axis_names: Optional[Sequence[str]],
    index_df: Optional[pd.DataFrame],
) -> Tuple[pd.DataFrame, Optional[Tuple[int, ...]]]:
    """A sweep's cells (one row each) and, unless ``index_df`` was given (flat output), its grid's shape."""
    limits = axis_limits(model, activation_name, n_pos)
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give either index_axis_names or index_df")
        unknown = [a for a in index_axis_names if a not in limits]
        if unknown:
            raise ValueError(f"unknown index axis names {unknown}; known: {sorted(limits)}")
        grid = tuple(limits[a] for a in index_axis_names)
        return make_df_from_ranges(grid, index_axis_names), grid
    if index_axis_names is not None:
        raise ValueError("give index_axis_names or index_df, not both")
    check_index_df(index_df, limits)
    return index_df, None


# ---- what a backend needs of a plan ------------------------------------------------------------
@dataclass
class NativeWork:
    """A plan's cells as the native driver runs them.

    ``groups`` maps a first changed position ``start`` to its cells, sorted by entry point;
    ``group_resid(start)`` returns ``cell -> [batch, pos - start, d_model]``, the residual a cell
    of that group enters the forward with (an activation plan's also takes ``record``, which receives the
    hooks of the patched layer for metrics that read activations: ``native.cells.cell_resid``).
    ``no_ops`` change nothing: their value is the
    corrupted baseline. ``logits_of``, when set, gives each grouped cell's full
    ``[batch, pos, d_vocab]`` logits directly (no forward from an entry residual).
    """

    groups: Dict[int, List[NativeCell]]
    no_ops: List[int]
    group_resid: Callable[[int], Callable[[int], torch.Tensor]]
    logits_of: Optional[Callable[[int], torch.Tensor]] = None


class PatchPlan(ABC):
    """What the driver needs of a plan: its cells, and how each backend patches them.

    Cells are numbered by their place in ``cells``; the driver hands each backend method the
    cells (a subset, in order) that this process runs, and refers to them by their number in
    that list.
    """

    #: progress-bar description and unit
    label: str = "patching"
    unit: str = "cell"
    #: why the native backend cannot run this plan (``None``: it can)
    native_unsupported: Optional[str] = None
    #: why only the native backend can run this plan (``None``: the hook backend can too)
    needs_native: Optional[str] = None
    #: whether ``patched_logits`` takes ``capture`` hooks (for metrics that read activations)
    captures_activations: bool = False

    @property
    @abstractmethod
    def cells(self) -> Sequence[Any]:
        """Every cell of the plan, in run order."""

    @abstractmethod
    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        """Validate and fetch the inputs the cells read (run once, after the backend is chosen;
        ``engine`` is the checked native engine when the native backend runs the plan)."""

    def native_activation_reason(self, names: Sequence[str], n_layers: int) -> Optional[str]:
        """Why the native backend cannot give metrics the activations at ``names`` exactly (``None``: it can)."""
        return f"metrics read internal activations {list(names)}, which the native backend does not compute for this plan"

    def hooks_context(self) -> ContextManager:
        """Model settings the hook backend needs for the whole run (e.g. the Q/K/V input fork)."""
        return nullcontext()

    @abstractmethod
    def patched_logits(self, cells: Sequence[Any]) -> torch.Tensor:
        """Hook backend: logits ``[len(cells) * batch, pos, d_vocab]`` of one forward with each
        cell's patch in its own ``batch`` rows. A plan with ``captures_activations`` also takes
        ``capture``: ``(hook name, hook)`` pairs run after its patches in that forward."""

    @abstractmethod
    def native_work(self, engine: NativeEngine, cells: Sequence[Any]) -> NativeWork:
        """Native backend: ``cells`` grouped by first changed position, with their entry residuals."""
