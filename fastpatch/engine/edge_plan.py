"""Every writer -> reader edge of a model as one path plan: exact edge patching, batched.

The edge layout (writer and reader order, names, which edges exist) is defined here once and
shared with edge attribution (``fastpatch.attribution.edges``), so exact values and estimates
lie side by side cell for cell:

- writers: ``"embed"``, then per layer ``"L{l}H{h}"`` for every head and ``"MLP{l}"``;
- readers: per layer ``"L{l}H{h}.q"`` for every query head, then ``.k``, then ``.v``, then
  ``"MLP{l}.in"``; last ``"logits"``. On grouped-query models a key/value reader is a K/V head,
  named ``"L{l}KV{g}.k"`` / ``"L{l}KV{g}.v"`` (one reader per group; see ``engine.direct_path``);
- an edge exists when the reader reads the writer (``direct_path.reads``).

An edge's cell patches the reader's input alone with the writer's clean-minus-corrupted write
(``direct_path.PathPlan``): on the native backend it joins the forward at the reader's layer,
reusing the corrupted run before it, and only the reader (one head's attention, a K/V head's
group or one MLP) is recomputed for its rows before the batched blocks after it.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastpatch.engine.direct_path import PathCell, PathPlan, Writer, n_reader_heads, reads

_QKV = ("q", "k", "v")


class Reader(NamedTuple):
    """A reader: ``component`` of block ``layer`` (``n_layers`` for the logits), reader head ``head``."""

    component: str
    layer: int
    head: int


class EdgeLayout(NamedTuple):
    """The writer and reader axes of every edge result, with their names."""

    writers: List[Writer]
    readers: List[Reader]
    writer_names: List[str]
    reader_names: List[str]


def edge_layout(cfg: Any) -> EdgeLayout:
    """Writers and readers of a model with config ``cfg``, in the order of the edge axes."""
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    grouped = n_reader_heads(cfg, "k") != n_heads
    writers, writer_names = [Writer("embed", -1)], ["embed"]
    readers: List[Reader] = []
    reader_names: List[str] = []
    for l in range(n_layers):
        writers += [Writer("head", l, h) for h in range(n_heads)] + [Writer("mlp", l)]
        writer_names += [f"L{l}H{h}" for h in range(n_heads)] + [f"MLP{l}"]
        for c in _QKV:
            kv = grouped and c != "q"
            for h in range(n_reader_heads(cfg, c)):
                readers.append(Reader(c, l, h))
                reader_names.append(f"L{l}{'KV' if kv else 'H'}{h}.{c}")
        readers.append(Reader("mlp_in", l, 0))
        reader_names.append(f"MLP{l}.in")
    readers.append(Reader("logits", n_layers, 0))
    reader_names.append("logits")
    return EdgeLayout(writers, readers, writer_names, reader_names)


def valid_edges(cfg: Any, layout: EdgeLayout, device: Optional[torch.device] = None) -> Bool[Tensor, "writer reader"]:
    """``[n_writers, n_readers]``: True where the reader reads the writer (comes after it)."""
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    mask = [[reads(w, r.component, r.layer, parallel) for r in layout.readers] for w in layout.writers]
    return torch.tensor(mask, dtype=torch.bool, device=device)


class EdgePlan(PathPlan):
    """One cell per valid edge (per edge and position with ``per_position``), writer-major.

    ``tokens`` is the run every cell patches, ``clean_cache`` the run the writes come from (for
    the noising direction: the clean tokens and the corrupted run's cache).
    """

    unit = "edge"

    def __init__(self, model: Any, tokens: Tensor, clean_cache: Any, corrupted_cache: Any, per_position: bool = False):
        cfg = model.cfg
        self.layout = edge_layout(cfg)
        self.valid = valid_edges(cfg, self.layout)
        self.n_pos = int(tokens.shape[1]) if per_position else None
        positions: List[Optional[int]] = list(range(self.n_pos)) if per_position else [None]
        self.index: List[Tuple[int, int, Optional[int]]] = []  # (writer, reader, pos) of each cell
        cells = []
        for w, r in torch.nonzero(self.valid).tolist():
            reader = self.layout.readers[r]
            for pos in positions:
                cells.append(PathCell(w, reader.layer, reader.head, reader.component, pos))
                self.index.append((w, r, pos))
        super().__init__(model, tokens, clean_cache, corrupted_cache, self.layout.writers, cells, "exact")
        self.label = "exact edges" + (" by position" if per_position else "")

    def scores(self, values: Float[Tensor, " cells"]) -> Tensor:
        """Per-cell values as ``[n_writers, n_readers]`` (``[n_writers, n_readers, pos]`` per position), 0 off the edges."""
        shape = self.valid.shape + ((self.n_pos,) if self.n_pos is not None else ())
        out = torch.zeros(shape, device=values.device, dtype=values.dtype)
        w, r, p = zip(*self.index) if self.index else ((), (), ())
        where = (torch.tensor(w, dtype=torch.long), torch.tensor(r, dtype=torch.long))
        if self.n_pos is not None:
            where += (torch.tensor(p, dtype=torch.long),)
        out[tuple(i.to(values.device) for i in where)] = values
        return out
