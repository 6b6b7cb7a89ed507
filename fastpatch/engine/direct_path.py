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

Two backends, as for activation patching: ``hooks`` runs the model with one hook per reader
layer over a batch of stacked cells; ``native`` recomputes only the reader (one head's
attention, or one MLP) and the blocks after it, from the first position the source's write
changes, with every destination head's Q/K/V input projected at once per source
(``fastpatch.ops.delta_projection``, a fused Triton kernel on GPU).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastpatch.engine.native.cells import ATTN, entry_point, first_changed_positions
from fastpatch.engine.native.model import NativeModel, Trace
from fastpatch.engine.plan import Chunk, make_chunks
from fastpatch.engine.runner import MetricSet, _with_oom_retry, run_native_cells
from fastpatch.ops.delta_projection import delta_projection

READERS = ("q", "k", "v", "mlp_in", "logits")
METHODS = ("exact", "linear")

# (source number, reader layer, reader head); head is 0 for mlp_in, layer and head 0 for logits.
PathCell = Tuple[int, int, int]


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
    for s, (src_layer, _) in enumerate(sources):
        if component == "logits":
            cells.append((s, n_layers, 0))
        elif component == "mlp_in":
            first = src_layer + 1 if parallel else src_layer
            cells.extend((s, layer, 0) for layer in range(first, n_layers))
        else:
            cells.extend((s, layer, head) for layer in range(src_layer + 1, n_layers) for head in range(n_heads))
    return cells


# ---- hook backend ------------------------------------------------------------------------------
def _reader_hook_name(component: str, layer: int) -> str:
    if component == "logits":
        return "ln_final.hook_in"
    if component == "mlp_in":
        return f"blocks.{layer}.ln2.hook_in"
    return f"blocks.{layer}.attn.hook_{component}_input"


def run_hooks(
    model: Any, tokens: Tensor, deltas: Tensor, cells: List[PathCell], component: str,
    metrics: MetricSet, values: Tensor, per_chunk: int, bar: Any,
) -> None:
    """Exact path patching through ``run_with_hooks``, cells stacked along the batch."""
    from transformer_lens.patching import _split_qkv_input

    batch = tokens.shape[0]
    split = _split_qkv_input(model) if component in ("q", "k", "v") else nullcontext()

    def run(chunk: Chunk) -> None:
        by_layer: Dict[int, List[Tuple[int, int, int]]] = defaultdict(list)
        for local, (s, layer, head) in enumerate(cells[chunk.start : chunk.stop]):
            by_layer[layer].append((local, s, head))
        fired: List[str] = []
        hooks = []
        for layer, members in by_layer.items():
            rows = torch.tensor([m[0] for m in members], device=deltas.device)
            src = torch.tensor([m[1] for m in members], device=deltas.device)
            heads = torch.tensor([m[2] for m in members], device=deltas.device)
            name = _reader_hook_name(component, layer)

            def hook(act: Tensor, hook: Any, rows=rows, src=src, heads=heads, name=name) -> Tensor:
                fired.append(name)
                patched = act.clone()
                view = patched.view(len(chunk), batch, *act.shape[1:])
                if component in ("q", "k", "v"):  # [cells, batch, pos, n_heads, d_model]
                    view[rows, :, :, heads] += deltas[src].to(act.dtype)
                else:
                    view[rows] += deltas[src].to(act.dtype)
                return patched

            hooks.append((name, hook))
        logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        missing = {name for name, _ in hooks} - set(fired)
        if missing:  # a reader hook that never fires would leave the metric silently unpatched
            raise NotImplementedError(f"{sorted(missing)} did not fire: the model has no such reader input")
        for local in range(len(chunk)):
            values[chunk.start + local] = metrics.evaluate(logits[local * batch : (local + 1) * batch])
        bar.update(len(chunk))

    with split:
        _with_oom_retry(make_chunks(len(cells), per_chunk), run)


# ---- native backend ----------------------------------------------------------------------------
class NativePaths:
    """Entry residuals of path cells on the native forward."""

    def __init__(self, native: NativeModel, trace: Trace, deltas: Tensor, sources: List[Tuple[int, int]], component: str, method: str):
        self.native, self.trace, self.deltas, self.sources = native, trace, deltas, sources
        self.component, self.method = component, method
        self._projections: Dict[int, Tensor] = {}
        if component in ("q", "k", "v"):
            attr = {"q": "W_Q", "k": "W_K", "v": "W_V"}[component]
            weights = [getattr(L, attr) for L in native.layers]  # [heads, d_model, d_head]
            self._W = torch.stack([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in weights])
            self._resid = torch.stack(trace.resid_pre)
            self._ln_w = torch.stack([L.ln1_w for L in native.layers])
            self._ln_b = None if native.layers[0].ln1_b is None else torch.stack([L.ln1_b for L in native.layers])

    def starts(self) -> List[Optional[int]]:
        """Each source's first position whose write changes (``None``: it writes nothing different),
        read back to the host in one transfer."""
        return first_changed_positions(torch.stack([(d != 0).flatten(2).any(-1).any(0) for d in self.deltas]))

    def entry(self, cell: PathCell) -> Tuple[int, int]:
        _, layer, _ = cell
        if self.component == "mlp_in":
            return layer + 1, ATTN
        if self.component == "logits":
            return self.native.n_layers, ATTN
        return entry_point(self.native, "z", layer)

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

    def resid_factory(self, start: int) -> Callable[[int], Tensor]:
        """``cell -> [batch, pos - start, d_model]`` entry residual for cells whose source starts at ``start``."""
        native, trace, s = self.native, self.trace, start

        def resid(cell_index: int) -> Tensor:
            source, layer, head = self.cells[cell_index]
            delta = self.deltas[source][:, s:]
            if self.component == "mlp_in":
                L = native.layers[layer]
                x = trace.resid_pre[layer] if native.parallel else trace.resid_mid[layer]
                mlp_out = native.mlp_from_normalized(layer, self._normalized_with_delta(x[:, s:], delta, L.ln2_w, L.ln2_b))
                if native.parallel:
                    return trace.resid_pre[layer][:, s:] + trace.attn_out[layer][:, s:] + mlp_out
                return trace.resid_mid[layer][:, s:] + mlp_out
            if self.component == "logits":
                return trace.resid_final[:, s:] + delta  # only the final norm reads it from here
            z_head = self._head_z(source, layer, head, s)
            z = trace.z[layer][:, s:].clone()
            z[:, :, head] = z_head
            resid = trace.resid_pre[layer][:, s:] + native.attn_out(layer, z)
            return resid + trace.mlp_out[layer][:, s:] if native.parallel else resid

        return resid

    def _head_z(self, source: int, layer: int, head: int, s: int) -> Tensor:
        """Destination head's output ``[batch, pos - s, d_head]`` with its q, k or v patched."""
        native, trace = self.native, self.trace
        kv = head // (native.n_heads // native.n_kv_heads)
        patched = self._head_input(source, layer, head)[:, :, None]  # [batch, pos, 1, d_head]
        q = patched if self.component == "q" else trace.q[layer][:, :, head : head + 1]
        k_rot = native.rotate(layer, patched, 0) if self.component == "k" else trace.k_rot[layer][:, :, kv : kv + 1]
        v = patched if self.component == "v" else trace.v[layer][:, :, kv : kv + 1]
        _, z = native.attend(native.rotate(layer, q[:, s:], s), k_rot, v, s)
        return z[:, :, 0]

    def run(self, cells: List[PathCell], metrics: MetricSet, values: Tensor, **options: Any) -> None:
        self.cells = cells
        groups: Dict[int, list] = defaultdict(list)
        no_ops = []
        starts = self.starts()
        for i, cell in enumerate(cells):
            start = starts[cell[0]]
            if start is None:
                no_ops.append(i)
            else:
                groups[start].append((i,) + self.entry(cell))
        for members in groups.values():  # by entry, then source: a chunk touches few sources
            members.sort(key=lambda c: (c[1], c[2], cells[c[0]][0]))
        if self.component == "logits" and self.method == "linear":
            self._run_linear_logits(groups, metrics, values, options["bar"])
            groups = {}
        run_native_cells(self.native, self.trace, metrics, dict(sorted(groups.items())), no_ops, self._chunk_resid, values, **options)

    def _chunk_resid(self, start: int) -> Callable[[int], Tensor]:
        self._projections.clear()  # keep only the sources of the current group
        return self.resid_factory(start)

    def _run_linear_logits(self, groups: Dict[int, list], metrics: MetricSet, values: Tensor, bar: Any) -> None:
        """Direct logit paths with the final norm linearised: logits from the normalised residual."""
        native, trace = self.native, self.trace
        for start, members in groups.items():
            for i, _, _ in members:
                source = self.cells[i][0]
                x = trace.resid_final
                normalized = native.final_norm(x) + native.linearised_norm_delta(x, self.deltas[source], native.lnf_w)
                values[i] = metrics.evaluate(native.unembed(normalized))
                bar.update(1)
