"""Peak bytes of CPU tensor storage allocated while a block runs, measured by intercepting every
op (a TorchDispatchMode), so the memory planner can be checked on a machine without a GPU.

Tensors that exist before the block (weights, caches) are not counted; a storage counts from the
op that creates it until the last tensor viewing it is garbage-collected.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.refs: dict = {}  # storage pointer -> [live tensors, bytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self.refs.get(key)
            if entry is None:
                entry = self.refs[key] = [0, storage.nbytes()]
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out
