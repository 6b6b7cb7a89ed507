"""Sharding a sweep's cells across ``torch.distributed`` ranks.

Each rank computes every ``world_size``-th cell (interleaved, so ranks get a similar mix of cheap
and expensive cells) on its own device, then one ``all_reduce`` gives every rank the full result.
Works with any backend ``torch.distributed`` supports for the values' device (``gloo`` on CPU,
``nccl`` on GPUs). Launch with ``torchrun`` and call ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def shard(distributed: Optional[bool]) -> Optional[Tuple[int, int]]:
    """``(rank, world_size)`` when the sweep is to be sharded, else ``None``.

    ``distributed=None`` shards whenever a process group of more than one rank is initialised;
    ``True`` requires one; ``False`` never shards.
    """
    if distributed is False:
        return None
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun "
            "and call torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    if not ready or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def my_cells(n_cells: int, rank_world: Optional[Tuple[int, int]]) -> List[int]:
    """The plan's cell numbers this rank computes."""
    if rank_world is None:
        return list(range(n_cells))
    rank, world = rank_world
    return list(range(rank, n_cells, world))


def gather(local: torch.Tensor, cells: List[int], n_cells: int, rank_world: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Every rank's ``local`` values (rows = its ``cells``) assembled into the full ``[n_cells, ...]``."""
    if rank_world is None:
        return local
    import torch.distributed as dist

    full = torch.zeros((n_cells,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    full[torch.tensor(cells, dtype=torch.long, device=local.device)] = local
    dist.all_reduce(full)  # each cell is computed by exactly one rank, zero on the others
    return full
