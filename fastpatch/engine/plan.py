"""Sweeps, cells and memory-budgeted chunks.

A *sweep* is what one ``get_act_patch_*`` call asks for: one activation name, one patch setter
and a table of indices (one row per *cell*, the first column always the layer). Several sweeps
can share one plan (the ``*_every`` helpers run all their sweeps in the same batched passes).
The plan cuts the cells into chunks whose batched forward fits a memory budget; values never
depend on where the cuts fall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from transformer_lens import utilities as tl_utils

from fastpatch.engine.setters import setter_axes


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


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of the plan's cells, run in one batched forward."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def cell_locations(sweeps: List[Sweep]) -> List[Tuple[int, int]]:
    """(sweep number, row in that sweep) for every cell of the plan, in run order."""
    return [(s, r) for s, sweep in enumerate(sweeps) for r in range(len(sweep))]


def forward_bytes_per_row(cfg: Any, n_pos: int, dtype_bytes: int) -> int:
    """Upper estimate of the memory one batch row holds at the peak of a hooked forward.

    Residual-sized tensors (about a dozen live at once with hooks, norms and the clone a patch
    makes), the MLP hidden layer, Q/K/V, attention scores and pattern per head, and the logits
    twice (the logits and one same-sized temporary inside a typical metric, e.g. log_softmax).
    """
    d_model, n_heads = int(cfg.d_model), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    d_vocab = int(cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) and cfg.d_vocab_out > 0 else cfg.d_vocab)
    per_pos = 12 * d_model + 3 * d_mlp + 4 * n_heads * n_pos + 2 * d_vocab
    return per_pos * n_pos * dtype_bytes


def default_memory_budget(device: torch.device) -> int:
    """Bytes a chunk's forward may use: half the free GPU memory, or a quarter of free RAM (<= 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return int(min(available // 4, 4 << 30))


def cells_per_chunk(
    cfg: Any,
    batch: int,
    n_pos: int,
    dtype_bytes: int,
    device: torch.device,
    chunk_size: Optional[int],
    memory_budget: Optional[int],
) -> int:
    """How many cells one batched forward runs: ``chunk_size`` if given, else from the budget."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer (cells per forward), got {chunk_size!r}")
        return chunk_size
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    elif memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    rows = memory_budget // max(1, forward_bytes_per_row(cfg, n_pos, dtype_bytes))
    return max(1, int(rows) // batch)


def make_chunks(n_cells: int, per_chunk: int) -> List[Chunk]:
    """Equal-sized contiguous chunks (the last one may be smaller)."""
    n_chunks = -(-n_cells // per_chunk)
    size = -(-n_cells // max(1, n_chunks))  # balance: 10 cells at 8 per chunk -> 5 + 5, not 8 + 2
    return [Chunk(start, min(start + size, n_cells)) for start in range(0, n_cells, size)]
