"""Memory-budgeted chunks: how many cells one batched forward runs.

A chunk is a contiguous range of a plan's cells run in one batched forward (``batch`` rows per
cell). Its size comes from the caller's ``chunk_size``, or from ``memory_budget`` divided by a
per-row estimate of the backend's peak memory. Values never depend on where the cuts fall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of the plan's cells, run in one batched forward."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


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


@dataclass(frozen=True)
class ChunkBudget:
    """A run's validated chunking options: a fixed ``chunk_size``, else a memory budget in bytes."""

    chunk_size: Optional[int]
    memory_bytes: int

    @classmethod
    def from_options(cls, chunk_size: Optional[int], memory_budget: Optional[int], device: torch.device) -> "ChunkBudget":
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer (cells per forward), got {chunk_size!r}")
        budget = memory_budget if memory_budget is not None else default_memory_budget(device)
        if budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
        return cls(chunk_size, budget)

    def cells_per_chunk(self, bytes_per_row: int, batch: int) -> int:
        """``chunk_size`` if given, else as many cells (``batch`` rows each) as the budget holds, at least one."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, int(self.memory_bytes // max(1, bytes_per_row)) // batch)


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


def make_chunks(n_cells: int, per_chunk: int) -> List[Chunk]:
    """Equal-sized contiguous chunks (the last one may be smaller); none for no cells."""
    if n_cells == 0:  # e.g. a rank of a distributed run with more ranks than cells
        return []
    n_chunks = -(-n_cells // per_chunk)
    size = -(-n_cells // max(1, n_chunks))  # balance: 10 cells at 8 per chunk -> 5 + 5, not 8 + 2
    return [Chunk(start, min(start + size, n_cells)) for start in range(0, n_cells, size)]
