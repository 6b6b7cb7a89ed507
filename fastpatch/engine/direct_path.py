"""Direct path patching: a source head's write into one reader's input alone, batched.

A path cell is (source head, reader). The source's clean-minus-corrupted residual write
``delta = z_clean[:, :, h] @ W_O[h] - z_corr[:, :, h] @ W_O[h]`` is added to the reader's own copy
of the residual and nowhere else:

- ``q`` / ``k`` / ``v``: destination head ``(layer, head)``'s pre-norm Q/K/V input
  (TransformerLens's ``use_split_qkv_input`` fork), for layers after the source's;
- ``mlp_in``: the MLP input of a block (``ln2``'s input), for blocks whose MLP reads the source:
  the source's own block and later ones (parallel attention+MLP blocks: later ones only);
- ``logits``: the final norm's input (the direct logit path).

``method="exact"`` re-normalises ``resid + delta`` with the reader's norm; ``method="linear"`` is
the LayerNorm-linearised form of TransformerLens issue #111: the norm's scale is frozen at the
corrupted run's, ``normalize(x + delta) ~ normalize(x) + (delta - mean delta) / scale(x) * w``
(no centring for RMSNorm). Its error: it drops the change of the scale itself, which is first
order in the part of ``delta`` along the (centred) residual, ``-(x_hat . delta / d_model) x_hat / scale``
with ``x_hat = centred(x) / scale``, plus second-order terms. So it is exact to first order only
for writes orthogonal to the residual they are added to, and otherwise a cheap approximation
whose quality the exact method measures (tests/test_direct_path.py compares them).

:class:`DirectPathPlan` is the plan the driver runs. Two backends, as for activation patching:
``hooks`` runs the model with one hook per reader layer over a batch of stacked cells; ``native`` recomputes only the reader (one head's
attention, or one MLP) and the blocks after it, from the first position the source's write
changes, with every destination head's Q/K/V input projected at once per source
(``fastpatch.ops.delta_projection``, a fused Triton kernel on GPU).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastpatch._tl_private import check_direct_path_support, split_qkv_input
from fastpatch.engine.checks import cached_activation, check_cached_activation
from fastpatch.engine.native.backend import group_by_start
from fastpatch.engine.native.cells import ATTN, Entry, entry_point, first_changed_positions
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.plan import NativeWork, PatchPlan
from fastpatch.ops.delta_projection import delta_projection

READERS = ("q", "k", "v", "mlp_in", "logits")
METHODS = ("exact", "linear")
_QKV = ("q", "k", "v")


class PathCell(NamedTuple):
    """A path: source number (in the plan's ``sources``) into a reader (head 0 for ``mlp_in``;
    layer ``n_layers`` and head 0 for ``logits``)."""

    source: int
    layer: int
    head: int


def source_writes(model: Any, clean_cache: Any, corrupted_cache: Any, sources: List[Tuple[int, int]]) -> Tensor:
    """``[n_sources, batch, pos, d_model]`` clean-minus-corrupted residual writes, computed as TransformerLens does."""
    deltas = []
    for layer, head in sources:
        W_O = model.blocks[layer].attn.W_O[head]
        name = f"blocks.{layer}.attn.hook_z"
        deltas.append(clean_cache[name][:, :, head] @ W_O - corrupted_cache[name][:, :, head] @ W_O)
    return torch.stack(deltas)


def path_cells(model: Any, sources: List[Tuple[int, int]], component: str, parallel: bool) -> List[PathCell]:
    """Every (source, reader) pair the reader can read the source in, in TransformerLens's order."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    cells = []
    for source, (src_layer, _) in enumerate(sources):
        if component == "logits":
            cells.append(PathCell(source, n_layers, 0))
        elif component == "mlp_in":
            first = src_layer + 1 if parallel else src_layer
            cells.extend(PathCell(source, layer, 0) for layer in range(first, n_layers))
        else:
            cells.extend(PathCell(source, layer, head) for layer in range(src_layer + 1, n_layers) for head in range(n_heads))
    return cells


class DirectPathPlan(PatchPlan):
    """Every path from ``sources`` (``(layer, head)`` pairs) into every reader of kind ``component``."""

    unit = "path"

    def __init__(
        self, model: Any, tokens: Tensor, clean_cache: Any, corrupted_cache: Any, sources: List[Tuple[int, int]],
        component: str, method: str,
    ):
        if component not in READERS:
            raise ValueError(f"component must be one of {READERS}, got {component!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        cfg = model.cfg
        for layer, head in sources:
            if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
                raise ValueError(f"source head ({layer}, {head}) is out of range for {cfg.n_layers} layers x {cfg.n_heads} heads")
        self.source_layers = sorted({layer for layer, _ in sources})
        check_direct_path_support(model, self.source_layers, component if component in _QKV else "q")
        self.model, self.tokens, self.clean_cache, self.corrupted_cache = model, tokens, clean_cache, corrupted_cache
        self.sources, self.component, self.method = sources, component, method
        self.label = f"direct path [{component}]"
        if method == "linear":
            self.needs_native = "method='linear' needs the native backend, which this model or backend choice rules out"
        self._cells = path_cells(model, sources, component, parallel=bool(cfg.parallel_attn_mlp))
        self._deltas: Optional[Tensor] = None

    @property
    def cells(self) -> List[PathCell]:
        return self._cells

    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        for layer in self.source_layers:
            name = f"blocks.{layer}.attn.hook_z"
            for cache, what in ((self.clean_cache, "clean_cache"), (self.corrupted_cache, "corrupted_cache")):
                check_cached_activation(cached_activation(cache, name, what), name, self.tokens)
        self._deltas = source_writes(self.model, self.clean_cache, self.corrupted_cache, self.sources)

    def result(self, values: Tensor) -> Tensor:
        """The plan's ``[n_cells, 1]`` values as ``[n_sources, n_layers, n_heads]`` (``[n_sources, n_layers]``
        for ``mlp_in``, ``[n_sources]`` for ``logits``), 0.0 where a reader cannot read its source."""
        n_layers, n_heads = self.model.cfg.n_layers, self.model.cfg.n_heads
        shape = {"logits": (), "mlp_in": (n_layers,)}.get(self.component, (n_layers, n_heads))
        out = torch.zeros((len(self.sources),) + shape, device=values.device)
        for cell, value in zip(self._cells, values[:, 0]):
            out[{"logits": (cell.source,), "mlp_in": (cell.source, cell.layer)}.get(self.component, cell)] = value
        return out

    # ---- hook backend --------------------------------------------------------------------------
    def hooks_context(self) -> ContextManager:
        return split_qkv_input(self.model) if self.component in _QKV else nullcontext()

    def _reader_hook_name(self, layer: int) -> str:
        if self.component == "logits":
            return "ln_final.hook_in"
        if self.component == "mlp_in":
            return f"blocks.{layer}.ln2.hook_in"
        return f"blocks.{layer}.attn.hook_{self.component}_input"

    def patched_logits(self, cells: Sequence[PathCell]) -> Tensor:
        """Exact path patching: each cell's source write added to its reader's input in its own rows."""
        batch, deltas = self.tokens.shape[0], self._deltas
        by_layer: Dict[int, List[Tuple[int, int, int]]] = defaultdict(list)
        for local, cell in enumerate(cells):
            by_layer[cell.layer].append((local, cell.source, cell.head))
        fired: List[str] = []
        hooks = []
        for layer, members in by_layer.items():
            rows = torch.tensor([m[0] for m in members], device=deltas.device)
            sources = torch.tensor([m[1] for m in members], device=deltas.device)
            heads = torch.tensor([m[2] for m in members], device=deltas.device)
            name = self._reader_hook_name(layer)

            def hook(act: Tensor, hook: Any, rows=rows, sources=sources, heads=heads, name=name) -> Tensor:
                fired.append(name)
                patched = act.clone()
                view = patched.view(len(cells), batch, *act.shape[1:])
                if self.component in _QKV:  # [cells, batch, pos, n_heads, d_model]
                    view[rows, :, :, heads] += deltas[sources].to(act.dtype)
                else:
                    view[rows] += deltas[sources].to(act.dtype)
                return patched

            hooks.append((name, hook))
        logits = self.model.run_with_hooks(self.tokens.repeat(len(cells), 1), fwd_hooks=hooks)
        missing = {name for name, _ in hooks} - set(fired)
        if missing:  # a reader hook that never fires would leave the metric silently unpatched
            raise NotImplementedError(f"{sorted(missing)} did not fire: the model has no such reader input")
        return logits

    # ---- native backend ------------------------------------------------------------------------
    def native_work(self, engine: NativeEngine, cells: Sequence[PathCell]) -> NativeWork:
        return NativePaths(engine, self._deltas, self.sources, self.component, self.method, cells).work()


class NativePaths:
    """Entry residuals of path cells on the native forward."""

    def __init__(
        self, engine: NativeEngine, deltas: Tensor, sources: List[Tuple[int, int]], component: str, method: str,
        cells: Sequence[PathCell],
    ):
        self.native, self.trace = engine
        self.deltas, self.sources, self.cells = deltas, sources, cells
        self.component, self.method = component, method
        self._projections: Dict[int, Tensor] = {}
        if component in _QKV:
            native = self.native
            attr = {"q": "W_Q", "k": "W_K", "v": "W_V"}[component]
            weights = [getattr(L, attr) for L in native.layers]  # [heads, d_model, d_head]
            self._W = torch.stack([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in weights])
            self._resid = torch.stack(self.trace.resid_pre)
            self._ln_w = torch.stack([L.ln1_w for L in native.layers])
            self._ln_b = None if native.layers[0].ln1_b is None else torch.stack([L.ln1_b for L in native.layers])

    def work(self) -> NativeWork:
        """The cells by the first position their source's write changes, sorted by entry then source."""
        starts = self._source_starts()
        grouped = group_by_start([starts[cell.source] for cell in self.cells], [self._entry(cell) for cell in self.cells])
        linear_logits = self.component == "logits" and self.method == "linear"
        return NativeWork(grouped.groups, grouped.no_ops, self._group_resid, self._linear_logits if linear_logits else None)

    def _source_starts(self) -> List[Optional[int]]:
        """Each source's first position whose write changes (``None``: it writes nothing different),
        read back to the host in one transfer."""
        return first_changed_positions(torch.stack([(d != 0).flatten(2).any(-1).any(0) for d in self.deltas]))

    def _entry(self, cell: PathCell) -> Entry:
        if self.component == "mlp_in":
            return Entry(cell.layer + 1, ATTN)
        if self.component == "logits":
            return Entry(self.native.n_layers, ATTN)
        return entry_point(self.native, "z", cell.layer)

    def _projection(self, source: int) -> Tensor:
        """``[n_layers - src_layer - 1, batch, pos, n_heads * d_head]``: the source's effect on the
        Q/K/V input of every later head (exact: the patched projection; linear: its change)."""
        if source not in self._projections:
            first = self.sources[source][0] + 1
            ln_b = None if self._ln_b is None else self._ln_b[first:]
            self._projections[source] = delta_projection(
                self.deltas[source : source + 1], self._resid[first:], self._ln_w[first:], ln_b, self._W[first:],
                mode=self.method, norm=self.native.norm, eps=self.native.eps,
            )[0]
        return self._projections[source]

    def _head_input(self, source: int, layer: int, head: int) -> Tensor:
        """The patched q/k/v of one destination head, ``[batch, pos, d_head]``, before rotary."""
        native, d_head = self.native, self.native.d_head
        projected = self._projection(source)[layer - self.sources[source][0] - 1][..., head * d_head : (head + 1) * d_head]
        if self.method == "linear":
            return getattr(self.trace, self.component)[layer][:, :, head] + projected
        bias = getattr(native.layers[layer], {"q": "b_Q", "k": "b_K", "v": "b_V"}[self.component])
        return projected if bias is None else projected + bias[head]

    def _normalized_with_delta(self, x: Tensor, delta: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if self.method == "linear":
            return self.native.normalize(x, w, b) + self.native.linearised_norm_delta(x, delta, w)
        return self.native.normalize(x + delta, w, b)

    def _group_resid(self, start: int) -> Callable[[int], Tensor]:
        """``cell -> [batch, pos - start, d_model]`` entry residual for cells whose source starts at ``start``."""
        self._projections.clear()  # keep only the sources of the current group
        native, trace = self.native, self.trace

        def resid(cell_number: int) -> Tensor:
            source, layer, head = self.cells[cell_number]
            delta = self.deltas[source][:, start:]
            if self.component == "mlp_in":
                L = native.layers[layer]
                x = trace.resid_pre[layer] if native.parallel else trace.resid_mid[layer]
                normalized = self._normalized_with_delta(x[:, start:], delta, L.ln2_w, L.ln2_b)
                mlp_out = native.mlp_from_normalized(layer, normalized)
                if native.parallel:
                    return trace.resid_pre[layer][:, start:] + trace.attn_out[layer][:, start:] + mlp_out
                return trace.resid_mid[layer][:, start:] + mlp_out
            if self.component == "logits":
                return trace.resid_final[:, start:] + delta  # only the final norm reads it from here
            z = trace.z[layer][:, start:].clone()
            z[:, :, head] = self._head_z(source, layer, head, start)
            resid = trace.resid_pre[layer][:, start:] + native.attn_out(layer, z)
            return resid + trace.mlp_out[layer][:, start:] if native.parallel else resid

        return resid

    def _head_z(self, source: int, layer: int, head: int, start: int) -> Tensor:
        """Destination head's output ``[batch, pos - start, d_head]`` with its q, k or v patched."""
        native, trace = self.native, self.trace
        kv = head // (native.n_heads // native.n_kv_heads)
        patched = self._head_input(source, layer, head)[:, :, None]  # [batch, pos, 1, d_head]
        q = patched if self.component == "q" else trace.q[layer][:, :, head : head + 1]
        k_rot = native.rotate(layer, patched, 0) if self.component == "k" else trace.k_rot[layer][:, :, kv : kv + 1]
        v = patched if self.component == "v" else trace.v[layer][:, :, kv : kv + 1]
        _, z = native.attend(native.rotate(layer, q[:, start:], start), k_rot, v, start)
        return z[:, :, 0]

    def _linear_logits(self, cell_number: int) -> Tensor:
        """Direct logit path with the final norm linearised: ``[batch, pos, d_vocab]`` logits."""
        native, x = self.native, self.trace.resid_final
        delta = self.deltas[self.cells[cell_number].source]
        return native.unembed(native.final_norm(x) + native.linearised_norm_delta(x, delta, native.lnf_w))
