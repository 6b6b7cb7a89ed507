"""Out-of-memory retry: a chunk whose batched forward does not fit is halved and run again."""

from __future__ import annotations

from collections import deque
from typing import Callable, List

import torch

from fastpatch.engine import stats as run_stats
from fastpatch.engine.chunks import Chunk


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_with_oom_retry(chunks: List[Chunk], run: Callable[[Chunk], None]) -> None:
    """Run each chunk; one that does not fit in memory is halved and retried, down to one cell.

    Halving never changes a value: each cell's rows are computed the same way in any chunk.
    """
    pending = deque(chunks)
    stats = run_stats.current()
    while pending:
        chunk = pending.popleft()
        try:
            run(chunk)
            if stats is not None:
                stats.chunk_done(len(chunk))
        except RuntimeError as error:
            if not _is_oom(error) or len(chunk) == 1:
                raise
            if stats is not None:
                stats.oom_retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mid = chunk.start + len(chunk) // 2
            pending.extendleft([Chunk(mid, chunk.stop), Chunk(chunk.start, mid)])
