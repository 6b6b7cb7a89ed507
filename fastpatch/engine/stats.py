"""What the last sweep did: backend, chunking, out-of-memory retries, peak device memory and the work.

``fastpatch.last_run_stats()`` returns it after any sweep; useful to see how the memory planner
cut a large sweep, and how much the native backend skipped. Work (this process's cells):
``no_op_cells``, patches that change nothing (their value is the baseline, no forward);
``computed_cells``, the others; ``row_positions``, the prompt rows times positions their forwards
compute (the native backend: from each cell's first changed position; hooks: every position);
``row_position_blocks``, the same times the blocks from each cell's entry block to the last.

Peak memory is measured on CUDA (``torch.cuda.max_memory_allocated`` above what was allocated
when the sweep started); on CPU it is ``None`` (tests measure CPU memory with a tensor-allocation
meter instead).
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch


@dataclass
class RunStats:
    backend: str = ""
    cells: int = 0
    chunks: int = 0
    max_cells_per_chunk: int = 0
    oom_retries: int = 0
    peak_bytes: Optional[int] = None
    seconds: float = 0.0
    no_op_cells: int = 0
    computed_cells: int = 0
    row_positions: int = 0
    row_position_blocks: int = 0
    _start: float = field(default=0.0, repr=False)

    def computed(self, rows: int, positions: int, blocks: int, cells: int = 1) -> None:
        """``cells`` cells, each a forward of ``rows`` prompts over ``positions`` positions through ``blocks`` blocks."""
        self.computed_cells += cells
        self.row_positions += cells * rows * positions
        self.row_position_blocks += cells * rows * positions * blocks

    def chunk_done(self, n_cells: int) -> None:
        self.chunks += 1
        self.max_cells_per_chunk = max(self.max_cells_per_chunk, n_cells)

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


_current: contextvars.ContextVar[Optional[RunStats]] = contextvars.ContextVar("fastpatch_run_stats", default=None)
_last: Optional[RunStats] = None


def current() -> Optional[RunStats]:
    """The stats of the sweep running now, if any."""
    return _current.get()


@contextmanager
def recording(device: torch.device, cells: int) -> Iterator[RunStats]:
    """Collect a sweep's stats; they become ``last_run_stats()`` when it ends (even if it raised)."""
    global _last
    stats = RunStats(cells=cells, _start=time.perf_counter())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    token = _current.set(stats)
    try:
        yield stats
    finally:
        _current.reset(token)
        if cuda:
            torch.cuda.synchronize(device)
            stats.peak_bytes = int(torch.cuda.max_memory_allocated(device) - base)
        stats.seconds = time.perf_counter() - stats._start
        _last = stats


def last_run_stats() -> Optional[Dict[str, Any]]:
    """Stats of the most recent sweep in this process (``None`` before any)."""
    return None if _last is None else _last.as_dict()
