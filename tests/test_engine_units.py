"""Engine pieces that need no model: chunking, the chunk budget, out-of-memory retry."""

import pytest
import torch

from fastpatch.engine import stats as run_stats
from fastpatch.engine.chunks import Chunk, ChunkBudget, make_chunks
from fastpatch.engine.oom import run_with_oom_retry


def test_make_chunks_balances_and_covers():
    assert make_chunks(10, 8) == [Chunk(0, 5), Chunk(5, 10)]
    assert make_chunks(7, 7) == [Chunk(0, 7)]
    assert make_chunks(0, 3) == []  # a distributed rank with no cells


def test_chunk_budget():
    budget = ChunkBudget.from_options(None, 1000, torch.device("cpu"))
    assert budget.cells_per_chunk(bytes_per_row=10, batch=4) == 25
    assert budget.cells_per_chunk(bytes_per_row=10**6, batch=4) == 1  # never less than one cell
    assert ChunkBudget.from_options(3, None, torch.device("cpu")).cells_per_chunk(10**9, 4) == 3
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            ChunkBudget.from_options(bad, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="memory_budget"):
        ChunkBudget.from_options(None, 0, torch.device("cpu"))


def test_oom_halves_a_chunk_until_it_fits():
    ran = []

    def run(chunk):
        if len(chunk) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate ...")
        ran.append((chunk.start, chunk.stop))

    with run_stats.recording(torch.device("cpu"), 8) as stats:
        run_with_oom_retry([Chunk(0, 8)], run)
    assert ran == [(0, 2), (2, 4), (4, 6), (6, 8)]  # every cell once, in order
    assert stats.oom_retries == 3 and stats.chunks == 4 and stats.max_cells_per_chunk == 2


def test_other_errors_and_single_cells_are_not_retried():
    def fails(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_retry([Chunk(0, 4)], fails)

    def always_oom(chunk):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_oom_retry([Chunk(0, 4)], always_oom)
