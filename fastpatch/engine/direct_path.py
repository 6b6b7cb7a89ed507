"""Direct path patching: one writer's write into one reader's input alone, batched.

A path cell is (writer, reader). A *writer* is a term of the residual stream: the embedding
(``hook_embed``; positional embeddings are equal in both runs), a head (``z[:, :, h] @ W_O[h]``,
computed as TransformerLens does) or an MLP (``hook_mlp_out``). Its clean-minus-corrupted write
``delta`` is added to the reader's own copy of the residual and nowhere else:

- ``q`` / ``k`` / ``v``: a destination head's pre-norm Q/K/V input (TransformerLens's
  ``use_split_qkv_input`` fork), for layers after the writer's. On grouped-query models a K/V
  reader is a *K/V head* ``g`` (one reader per group of ``n_heads / n_kv_heads`` query heads):
  patching its input changes the keys/values every query head of the group reads. TransformerLens
  4.3 refuses K/V paths there ("per-query-head K/V semantics are undefined"); the K/V head's input
  is the one input that exists, so that is the reader fastpatch defines;
- ``mlp_in``: the MLP input of a block (``ln2``'s input), for blocks whose MLP reads the writer:
  a head's own block and later ones (parallel attention+MLP blocks: later ones only), an MLP's
  later blocks, every block for the embedding;
- ``logits``: the final norm's input (the direct logit path).

A cell may also restrict the write to one position ``pos`` (per-position edges: the writer and the
reader at the same residual position); a position where the write does not change is a no-op.

``method="exact"`` re-normalises ``resid + delta`` with the reader's norm; ``method="linear"`` is
the LayerNorm-linearised form of TransformerLens issue #111: the norm's scale is frozen at the
corrupted run's, ``normalize(x + delta) ~ normalize(x) + (delta - mean delta) / scale(x) * w``
(no centring for RMSNorm). Its error: it drops the change of the scale itself, which is first
order in the part of ``delta`` along the (centred) residual, ``-(x_hat . delta / d_model) x_hat / scale``
with ``x_hat = centred(x) / scale``, plus second-order terms. So it is exact to first order only
for writes orthogonal to the residual they are added to, and otherwise a cheap approximation
whose quality the exact method measures (tests/test_direct_path.py compares them).

:class:`PathPlan` is the plan the driver runs for any list of path cells; :class:`DirectPathPlan`
(head sources into one reader kind, ``fastpatch.patching.get_act_patch_direct_path*``) and
``engine.edge_plan.EdgePlan`` (every edge) build their cells. Two backends, as for activation
patching: ``hooks`` runs the model with one hook per reader over a batch of stacked cells;
``native`` recomputes only the reader (one head's attention, or a K/V head's group, or one MLP)
and the blocks after it, from the first position the write changes, with every destination
head's Q/K/V input projected at once per writer (``fastpatch.ops.delta_projection``, a fused
Triton kernel on GPU).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch._tl_private import check_direct_path_support, split_qkv_input
from fastpatch.engine.checks import cached_activation, check_cached_activation
from fastpatch.engine.native.backend import group_by_start
from fastpatch.engine.native.cells import ATTN, Entry, entry_point, first_changed_positions
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.plan import NativeWork, PatchPlan
from fastpatch.engine.probing import post_norm_qkv_forks, require_qkv_input_forks
from fastpatch.ops.delta_projection import delta_projection

READERS = ("q", "k", "v", "mlp_in", "logits")
METHODS = ("exact", "linear")
WRITERS = ("embed", "head", "mlp")
_QKV = ("q", "k", "v")


class Writer(NamedTuple):
    """A residual-stream writer: ``("embed", -1, 0)``, ``("head", layer, head)`` or ``("mlp", layer, 0)``."""

    kind: str
    layer: int
    head: int = 0

    @property
    def hook_name(self) -> str:
        if self.kind == "embed":
            return "hook_embed"
        if self.kind == "head":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_mlp_out"


class PathCell(NamedTuple):
    """A path: writer number ``source`` (in the plan's writers) into one reader.

    ``layer``: the reader's block (``n_layers`` for ``logits``); ``head``: the query head of a
    ``q`` reader, the K/V head of a ``k``/``v`` reader (the query head on models without grouped
    K/V), 0 for ``mlp_in``/``logits``; ``pos``: only that position of the write (``None``: all).
    """

    source: int
    layer: int
    head: int
    component: str
    pos: Optional[int] = None


def n_reader_heads(cfg: Any, component: str) -> int:
    """Readers per layer of a Q/K/V component: query heads, or K/V heads for ``k``/``v``."""
    kv = getattr(cfg, "n_key_value_heads", None)
    return int(kv) if component in ("k", "v") and kv is not None else int(cfg.n_heads)


def reads(writer: Writer, component: str, layer: int, parallel: bool) -> bool:
    """Whether the reader ``component`` of block ``layer`` reads ``writer`` (comes after it)."""
    if component == "logits" or writer.kind == "embed":
        return True
    if component == "mlp_in" and writer.kind == "head" and not parallel:
        return layer >= writer.layer  # a sequential block's MLP reads its own attention's output
    return layer > writer.layer


def writer_writes(
    model: Any, clean_cache: Any, corrupted_cache: Any, writers: Sequence[Writer]
) -> Float[Tensor, "writer batch pos d_model"]:
    """Every writer's clean-minus-corrupted residual write, head writes as TransformerLens computes them."""
    deltas = []
    for writer in writers:
        if writer.kind == "head":
            W_O = model.blocks[writer.layer].attn.W_O[writer.head]
            name = writer.hook_name
            deltas.append(clean_cache[name][:, :, writer.head] @ W_O - corrupted_cache[name][:, :, writer.head] @ W_O)
        else:
            deltas.append(clean_cache[writer.hook_name] - corrupted_cache[writer.hook_name])
    return torch.stack(deltas)


def path_cells(model: Any, writers: Sequence[Writer], component: str) -> List[PathCell]:
    """Every (writer, reader of kind ``component``) pair in which the reader reads the writer, in
    TransformerLens's order (writer by writer, then layer, then head)."""
    cfg = model.cfg
    n_layers, parallel = int(cfg.n_layers), bool(cfg.parallel_attn_mlp)
    heads = range(n_reader_heads(cfg, component)) if component in _QKV else [0]
    layers = [n_layers] if component == "logits" else range(n_layers)
    return [
        PathCell(source, layer, head, component)
        for source, writer in enumerate(writers)
        for layer in layers
        if reads(writer, component, layer, parallel)
        for head in heads
    ]


class PathPlan(PatchPlan):
    """Path cells (writer -> reader, optionally at one position) from ``writers``' clean-minus-corrupted writes.

    ``tokens`` is the run the cells patch (the corrupted run), ``clean_cache`` the run the writes
    come from; both caches must hold every writer's hook (``hook_embed``, ``hook_z``, ``hook_mlp_out``).
    """

    unit = "path"

    def __init__(
        self, model: Any, tokens: Tensor, clean_cache: Any, corrupted_cache: Any, writers: Sequence[Writer],
        cells: Sequence[PathCell], method: str = "exact",
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        cfg = model.cfg
        for writer in writers:
            if writer.kind not in WRITERS:
                raise ValueError(f"writer kind must be one of {WRITERS}, got {writer.kind!r}")
            if writer.kind == "head" and not (0 <= writer.layer < cfg.n_layers and 0 <= writer.head < cfg.n_heads):
                raise ValueError(
                    f"source head ({writer.layer}, {writer.head}) is out of range for {cfg.n_layers} layers x {cfg.n_heads} heads"
                )
        head_layers = sorted({w.layer for w in writers if w.kind == "head"})
        if head_layers:
            # TransformerLens's refusals for head writes other than z @ W_O; K/V on grouped-query
            # models is defined here (one reader per K/V head), so only "q"'s rules apply
            check_direct_path_support(model, head_layers, "q")
        components = {cell.component for cell in cells}
        if method == "linear" and "logits" in components and len(components) > 1:
            raise ValueError("method='linear' runs logits paths in a plan of their own")
        self.model, self.tokens, self.clean_cache, self.corrupted_cache = model, tokens, clean_cache, corrupted_cache
        self.writers, self.method = list(writers), method
        self.components = [c for c in READERS if c in components]
        if method == "linear":
            self.needs_native = "method='linear' needs the native backend, which this model or backend choice rules out"
        self._cells = list(cells)
        self._deltas: Optional[Tensor] = None
        after_norm = post_norm_qkv_forks(model, [cell.layer for cell in self._cells if cell.component in _QKV])
        if after_norm:  # TransformerLens's fork adds the write after ln1 there (BLOOM): hooks give its values
            self.native_unsupported = f"Q/K/V readers in blocks {after_norm} take the write after the norm"

    @property
    def cells(self) -> List[PathCell]:
        return self._cells

    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        if engine is None:  # hook patches need every Q/K/V reader's per-head input fork: refused before any patched forward
            for component in (c for c in _QKV if c in self.components):
                require_qkv_input_forks(self.model, sorted({c.layer for c in self._cells if c.component == component}), component)
        for name in dict.fromkeys(w.hook_name for w in self.writers):
            for cache, what in ((self.clean_cache, "clean_cache"), (self.corrupted_cache, "corrupted_cache")):
                check_cached_activation(cached_activation(cache, name, what), name, self.tokens)
        self._deltas = writer_writes(self.model, self.clean_cache, self.corrupted_cache, self.writers)

    def cell_delta(self, cell: PathCell) -> Float[Tensor, "batch pos d_model"]:
        """The write a cell adds to its reader: the writer's, or only its position ``cell.pos``."""
        delta = self._deltas[cell.source]
        if cell.pos is None:
            return delta
        only = torch.zeros_like(delta)
        only[:, cell.pos] = delta[:, cell.pos]
        return only

    # ---- hook backend --------------------------------------------------------------------------
    def hooks_context(self) -> ContextManager:
        return split_qkv_input(self.model) if any(c in _QKV for c in self.components) else nullcontext()

    @staticmethod
    def _reader_hook_name(component: str, layer: int) -> str:
        if component == "logits":
            return "ln_final.hook_in"
        if component == "mlp_in":
            return f"blocks.{layer}.ln2.hook_in"
        return f"blocks.{layer}.attn.hook_{component}_input"

    def patched_logits(self, cells: Sequence[PathCell]) -> Tensor:
        """Exact path patching: each cell's write added to its reader's input in its own rows."""
        batch = self.tokens.shape[0]
        by_reader: Dict[Tuple[str, int], List[Tuple[int, PathCell]]] = defaultdict(list)
        for local, cell in enumerate(cells):
            by_reader[(cell.component, cell.layer)].append((local, cell))
        fired: List[str] = []
        hooks = []
        for (component, layer), members in by_reader.items():
            device = self._deltas.device
            rows = torch.tensor([local for local, _ in members], device=device)
            heads = torch.tensor([cell.head for _, cell in members], device=device)
            deltas = torch.stack([self.cell_delta(cell) for _, cell in members])  # [members, batch, pos, d_model]
            name = self._reader_hook_name(component, layer)

            def hook(act: Tensor, hook: Any, rows=rows, heads=heads, deltas=deltas, name=name, qkv=component in _QKV) -> Tensor:
                fired.append(name)
                patched = act.clone()
                view = patched.view(len(cells), batch, *act.shape[1:])
                if qkv:  # [cells, batch, pos, reader heads (K/V heads for grouped k/v), d_model]
                    view[rows, :, :, heads] += deltas.to(act.dtype)
                else:
                    view[rows] += deltas.to(act.dtype)
                return patched

            hooks.append((name, hook))
        logits = self.model.run_with_hooks(self.tokens.repeat(len(cells), 1), fwd_hooks=hooks)
        missing = {name for name, _ in hooks} - set(fired)
        if missing:  # a reader hook that never fires would leave the metric silently unpatched
            raise NotImplementedError(f"{sorted(missing)} did not fire: the model has no such reader input")
        return logits

    # ---- native backend ------------------------------------------------------------------------
    def native_work(self, engine: NativeEngine, cells: Sequence[PathCell]) -> NativeWork:
        return NativePaths(engine, self, cells).work()


class DirectPathPlan(PathPlan):
    """Every path from ``sources`` (``(layer, head)`` pairs) into every reader of kind ``component``."""

    def __init__(
        self, model: Any, tokens: Tensor, clean_cache: Any, corrupted_cache: Any, sources: List[Tuple[int, int]],
        component: str, method: str,
    ):
        if component not in READERS:
            raise ValueError(f"component must be one of {READERS}, got {component!r}")
        writers = [Writer("head", layer, head) for layer, head in sources]
        super().__init__(model, tokens, clean_cache, corrupted_cache, writers, path_cells(model, writers, component), method)
        self.components, self.component = [component], component  # the kind asked for, even with no cells
        self.sources = sources
        self.label = f"direct path [{component}]"

    def result(self, values: Tensor) -> Tensor:
        """The plan's ``[n_cells, 1]`` values as ``[n_sources, n_layers, n_heads]`` (``n_key_value_heads``
        for ``k``/``v`` on grouped-query models; ``[n_sources, n_layers]`` for ``mlp_in``, ``[n_sources]``
        for ``logits``), 0.0 where a reader cannot read its source."""
        cfg = self.model.cfg
        n_layers = cfg.n_layers
        shape = {"logits": (), "mlp_in": (n_layers,)}.get(self.component)
        if shape is None:
            shape = (n_layers, n_reader_heads(cfg, self.component))
        out = torch.zeros((len(self.sources),) + shape, device=values.device)
        for cell, value in zip(self._cells, values[:, 0]):
            out[{"logits": (cell.source,), "mlp_in": (cell.source, cell.layer)}.get(self.component, cell[:3])] = value
        return out


class NativePaths:
    """Entry residuals of path cells on the native forward."""

    def __init__(self, engine: NativeEngine, plan: PathPlan, cells: Sequence[PathCell]):
        self.native, self.trace = engine
        self.plan, self.cells, self.method = plan, cells, plan.method
        self.writers = plan.writers
        self._projections: Dict[Tuple[int, Optional[int]], Tensor] = {}
        native = self.native
        # the plan's Q/K/V components side by side in one projection: [layer, d_model, columns]
        self._offsets: Dict[str, int] = {}
        blocks, offset = [], 0
        for component in (c for c in _QKV if c in plan.components):
            attr = {"q": "W_Q", "k": "W_K", "v": "W_V"}[component]
            weights = [getattr(L, attr) for L in native.layers]  # [heads, d_model, d_head]
            blocks.append(torch.stack([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in weights]))
            self._offsets[component] = offset
            offset += blocks[-1].shape[-1]
        if blocks:
            self._W = torch.cat(blocks, dim=-1)
            self._resid = torch.stack(self.trace.resid_pre)
            self._ln_w = torch.stack([L.ln1_w for L in native.layers])
            self._ln_b = None if native.layers[0].ln1_b is None else torch.stack([L.ln1_b for L in native.layers])

    def work(self) -> NativeWork:
        """The cells by the first position their write changes, sorted by entry then writer."""
        starts = self._cell_starts()
        grouped = group_by_start(starts, [self._entry(cell) for cell in self.cells])
        linear_logits = self.method == "linear" and "logits" in self.plan.components
        return NativeWork(grouped.groups, grouped.no_ops, self._group_resid, self._linear_logits if linear_logits else None)

    def _cell_starts(self) -> List[Optional[int]]:
        """Each cell's first position whose write changes (``None``: it writes nothing different),
        from every writer's changed positions read back to the host in one transfer."""
        deltas = self.plan._deltas
        changed = torch.stack([(d != 0).flatten(2).any(-1).any(0) for d in deltas]).cpu()  # [writers, pos]
        firsts, at = first_changed_positions(changed), changed.tolist()
        return [
            firsts[cell.source] if cell.pos is None else (cell.pos if at[cell.source][cell.pos] else None)
            for cell in self.cells
        ]

    def _entry(self, cell: PathCell) -> Entry:
        if cell.component == "mlp_in":
            return Entry(cell.layer + 1, ATTN)
        if cell.component == "logits":
            return Entry(self.native.n_layers, ATTN)
        return entry_point(self.native, "z", cell.layer)

    def _projection(self, cell: PathCell) -> Tensor:
        """``[n_layers - first, batch, pos, columns]``: the write's effect on the Q/K/V input of every
        head of every layer from ``first`` (the writer's next layer) on (exact: the patched
        projection; linear: its change)."""
        key = (cell.source, cell.pos)
        if key not in self._projections:
            first = self.writers[cell.source].layer + 1
            ln_b = None if self._ln_b is None else self._ln_b[first:]
            self._projections[key] = delta_projection(
                self.plan.cell_delta(cell)[None], self._resid[first:], self._ln_w[first:], ln_b, self._W[first:],
                mode=self.method, norm=self.native.norm, eps=self.native.eps,
            )[0]
        return self._projections[key]

    def _head_input(self, cell: PathCell) -> Tensor:
        """The patched q/k/v of the cell's reader head, ``[batch, pos, d_head]``, before rotary."""
        native, d_head = self.native, self.native.d_head
        first = self.writers[cell.source].layer + 1
        column = self._offsets[cell.component] + cell.head * d_head
        projected = self._projection(cell)[cell.layer - first][..., column : column + d_head]
        if self.method == "linear":
            return getattr(self.trace, cell.component)[cell.layer][:, :, cell.head] + projected
        bias = getattr(native.layers[cell.layer], {"q": "b_Q", "k": "b_K", "v": "b_V"}[cell.component])
        return projected if bias is None else projected + bias[cell.head]

    def _normalized_with_delta(self, x: Tensor, delta: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if self.method == "linear":
            return self.native.normalize(x, w, b) + self.native.linearised_norm_delta(x, delta, w)
        return self.native.normalize(x + delta, w, b)

    def _group_resid(self, start: int) -> Callable[[int], Tensor]:
        """``cell -> [batch, pos - start, d_model]`` entry residual for cells whose write starts at ``start``."""
        self._projections.clear()  # keep only the writers of the current group
        native, trace = self.native, self.trace

        def resid(cell_number: int) -> Tensor:
            cell = self.cells[cell_number]
            layer = cell.layer
            if cell.component == "mlp_in":
                delta = self.plan.cell_delta(cell)[:, start:]
                L = native.layers[layer]
                x = trace.resid_pre[layer] if native.parallel else trace.resid_mid[layer]
                normalized = self._normalized_with_delta(x[:, start:], delta, L.ln2_w, L.ln2_b)
                mlp_out = native.mlp_from_normalized(layer, normalized)
                if native.parallel:
                    return trace.resid_pre[layer][:, start:] + trace.attn_out[layer][:, start:] + mlp_out
                return trace.resid_mid[layer][:, start:] + mlp_out
            if cell.component == "logits":  # only the final norm reads it from here
                return trace.resid_final[:, start:] + self.plan.cell_delta(cell)[:, start:]
            heads, head_z = self._head_z(cell, start)
            z = trace.z[layer][:, start:].clone()
            z[:, :, heads] = head_z
            resid = trace.resid_pre[layer][:, start:] + native.attn_out(layer, z)
            return resid + trace.mlp_out[layer][:, start:] if native.parallel else resid

        return resid

    def _head_z(self, cell: PathCell, start: int) -> Tuple[slice, Tensor]:
        """The query heads whose output the reader's patch changes, and their output
        ``[batch, pos - start, heads, d_head]``: one head for a ``q`` reader, the K/V head's whole
        group (one head without grouped K/V) for ``k``/``v``."""
        native, trace, layer = self.native, self.trace, cell.layer
        group = native.n_heads // native.n_kv_heads
        patched = self._head_input(cell)[:, :, None]  # [batch, pos, 1, d_head]
        if cell.component == "q":
            heads, kv = slice(cell.head, cell.head + 1), cell.head // group
            q = patched
        else:
            heads, kv = slice(cell.head * group, (cell.head + 1) * group), cell.head
            q = trace.q[layer][:, :, heads]
        k_rot = native.rotate_k(layer, patched, 0) if cell.component == "k" else trace.k_rot[layer][:, :, kv : kv + 1]
        v = patched if cell.component == "v" else trace.v[layer][:, :, kv : kv + 1]
        _, z = native.attend(native.rotate_q(layer, q[:, start:], start), k_rot, v, start, layer, heads)
        return heads, z

    def _linear_logits(self, cell_number: int) -> Tensor:
        """Direct logit path with the final norm linearised: ``[batch, pos, d_vocab]`` logits."""
        native, x = self.native, self.trace.resid_final
        delta = self.plan.cell_delta(self.cells[cell_number])
        return native.unembed(native.final_norm(x) + native.linearised_norm_delta(x, delta, native.lnf_w))
