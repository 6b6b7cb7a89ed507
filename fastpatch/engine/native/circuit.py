"""Circuit evaluation on the native forward: every (circuit, ablation) cell's rows in one batched pass.

The semantics are ``engine.circuit_plan``'s (MIB / EAP-IG ``evaluate_graph``): on the clean prompts,
each reader's input is its input in this run minus the masked sum, over the writers outside the
circuit, of (the writer's output in this run - its output in the ablated run). Here that is a
functional forward of the cells' rows, block by block:

- each head's Q input (each K/V head's K and V input on grouped-query models) is the residual minus
  its own correction, normalised with the block's ``ln1`` and projected with that head's weights;
- each MLP's input is ``resid_mid`` (``resid_pre`` on parallel blocks) minus its correction;
- the final norm's input is the last residual minus the logits' correction;
- the residual stream itself is never rewritten (the hook form rewrites hook inputs only), and each
  writer's output in this run (head ``z[:, :, h] @ W_O[h]``, ``mlp_out``) minus its ablated output is
  kept in a ``[cells, writers, batch, pos, d_model]`` buffer as the block computes it.

Positions before a cell's first *changed* position are the clean run's for that cell: a reader's
correction there is a sum of (clean - ablated) writes of writers outside the circuit, and before the
first position where one of those writes differs every correction is zero, so by causality nothing
differs either. For the corrupted ablation that is the prefix clean and corrupted prompts share;
for zero / mean / resample usually position 0. Those positions are taken from the clean trace
(residuals, keys and values, logits) and computed once, not once per circuit: only the later
positions are computed, attending over the clean run's cached K/V prefix. A cell that changes
nothing (e.g. the full circuit) is a no-op: its value is the clean run's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from fastpatch.engine.chunks import Chunk, ChunkBudget, make_chunks
from fastpatch.engine.native import backend as native_backend
from fastpatch.engine.native.cells import ATTN, NativeCell, first_changed_positions
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.oom import run_with_oom_retry
from fastpatch.engine.plan import NativeWork

_QKV = ("q", "k", "v")


class NativeCircuits:
    """The native work of a ``CircuitPlan``'s cells: grouped by first changed position, each chunk one pass.

    ``plan`` is the ``engine.circuit_plan.CircuitPlan`` (prepared: its ablated writes and the clean
    embedding are set); ``cells`` the ``CircuitCell``s this process runs.
    """

    def __init__(self, engine: NativeEngine, plan: Any, cells: Sequence[Any], budget: ChunkBudget, dtype_bytes: int):
        self.native, self.trace = engine
        self.plan, self.cells, self.budget, self.dtype_bytes = plan, list(cells), budget, dtype_bytes
        native = self.native
        # (component, layer) -> the reader numbers of that hook point, by head; and how many writers
        # (a prefix of the writer order) its readers read
        self.readers: Dict[Tuple[str, int], List[int]] = defaultdict(list)
        for r, reader in enumerate(plan.layout.readers):
            self.readers[(reader.component, reader.layer)].append(r)
        self.n_read = {key: int(torch.nonzero(plan.valid[:, rs].any(1)).max()) + 1 for key, rs in self.readers.items()}
        # writer numbers: the first head of each layer and each layer's MLP
        self.first_head = {w.layer: i for i, w in reversed(list(enumerate(plan.layout.writers))) if w.kind == "head"}
        self.mlp_writer = {w.layer: i for i, w in enumerate(plan.layout.writers) if w.kind == "mlp"}
        # per layer: the Q, K and V reader heads side by side (they read the same writers) and their weights
        for l in range(native.n_layers):
            self.readers[("qkv", l)] = [r for c in _QKV for r in self.readers[(c, l)]]
            self.n_read[("qkv", l)] = self.n_read[("q", l)]
        self.weights = [torch.cat([L.W_Q, L.W_K, L.W_V]) for L in native.layers]  # [nq + 2 nkv, d_model, d_head]
        self.biases = [None if L.b_QKV is None else L.b_QKV.view(-1, native.d_head) for L in native.layers]
        self._logits: Dict[int, Tensor] = {}

    # ---- grouping --------------------------------------------------------------------------------
    def work(self) -> NativeWork:
        starts = self._starts()
        groups: Dict[int, List[NativeCell]] = defaultdict(list)
        no_ops = []
        for i, start in enumerate(starts):
            if start is None:
                no_ops.append(i)
            else:
                groups[start].append(NativeCell(i, 0, ATTN))
        self.groups = dict(sorted(groups.items()))
        self._chunk_of: Dict[int, Tuple[int, Chunk]] = {}
        for start, members in self.groups.items():
            per_chunk = self.budget.cells_per_chunk(self.bytes_per_row(start), int(self.trace.logits.shape[0]))
            for chunk in make_chunks(len(members), per_chunk):
                for m in members[chunk.start : chunk.stop]:
                    self._chunk_of[m.cell] = (start, chunk)
        return NativeWork(self.groups, no_ops, lambda start: None, self.logits_of)

    def _starts(self) -> List[Optional[int]]:
        """Each cell's first position where a writer outside its circuit (for some reader) writes
        differently in the clean and the ablated run (``None``: nowhere; the cell is the clean run)."""
        plan = self.plan
        # [ablations, writers, pos]: where each ablated write differs from the clean run's
        changed = (plan._ablated_writes != self.clean_writes()[None]).any(-1).any(2)
        off = plan.off.bool().any(2)  # [circuits, writers(, pos)]: writers that lose some edge
        circuits = torch.tensor([c.circuit for c in self.cells], dtype=torch.long, device=off.device)
        ablations = torch.tensor([c.ablation for c in self.cells], dtype=torch.long, device=changed.device)
        lost = off[circuits].to(changed.device)
        if not plan.per_position:
            lost = lost[..., None]
        return first_changed_positions((lost & changed[ablations]).any(1))

    def clean_writes(self) -> Float[Tensor, "writer batch pos d_model"]:
        """Every writer's output in the clean run (the model's own cached values), as the ablated writes are computed."""
        from fastpatch.engine.circuit_plan import writer_outputs

        acts = {"hook_embed": self.plan.clean_embed}
        for l in range(self.native.n_layers):
            acts[f"blocks.{l}.attn.hook_z"] = self.trace.z[l]
            acts[f"blocks.{l}.hook_mlp_out"] = self.trace.mlp_out[l]
        return writer_outputs(self.plan.model, acts, self.plan.layout.writers)

    def bytes_per_row(self, start: int) -> int:
        """A row's peak memory: the native forward's (full logits) plus the write buffer, one layer's
        ablated writes, and a hook point's corrections and per-head inputs."""
        native, n_pos = self.native, int(self.trace.logits.shape[1])
        widest = max(len(rs) for rs in self.readers.values())
        n_writers = len(self.plan.layout.writers)
        extra = (n_writers + native.n_heads + 3 * widest) * (n_pos - start) * native.d_model * self.dtype_bytes
        return native_backend.bytes_per_row(native, n_pos, start, True, self.dtype_bytes) + extra

    # ---- the forward -------------------------------------------------------------------------------
    def logits_of(self, cell: int) -> Float[Tensor, "batch pos d_vocab"]:
        """A cell's full logits: the clean run's before its start, its chunk's pass after (run on first request)."""
        if cell not in self._logits:
            self._logits.clear()  # the previous chunk's cells are done
            start, chunk = self._chunk_of[cell]
            members = self.groups[start]

            def run(part: Chunk) -> None:
                cells = [m.cell for m in members[part.start : part.stop]]
                self._logits.update(zip(cells, self._forward(start, cells)))

            run_with_oom_retry([chunk], run)
        suffix = self._logits.pop(cell)
        start = self.trace.logits.shape[1] - suffix.shape[1]
        return torch.cat([self.trace.logits[:, :start], suffix], dim=1)

    def _ln1(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s attention norm of the reader heads' inputs (``n_heads + 2 n_kv_heads`` residuals a
        row): ``native.normalize``, through torch's fused LayerNorm where it is one (the same formula, one pass
        over a tensor this plan's per-head inputs make 3 x heads times the residual's size)."""
        native, L = self.native, self.native.layers[layer]
        if native.norm == "LN" and L.ln1_w is not None and L.ln1_w.dtype == x.dtype:
            return F.layer_norm(x, (x.shape[-1],), L.ln1_w, L.ln1_b, native.eps)
        return native.normalize(x, L.ln1_w, L.ln1_b)

    def _rewritten(self, x: Tensor, off: Tensor, diff: Tensor, key: Tuple[str, int]) -> Tensor:
        """``[cells, readers, batch, pos, d_model]``: the residual ``x`` (``[cells * batch, pos, d_model]``) minus
        each reader's masked sum of (this run - ablated) writes: the readers' inputs."""
        n, n_read, readers = off.shape[0], self.n_read[key], self.readers[key]
        lost = off[:, :n_read, readers]  # [cells, writers read, readers(, pos)]
        x = x.view(n, 1, *diff.shape[2:])
        if self.plan.per_position:
            return x - torch.einsum("cwbpd,cwrp->crbpd", diff[:, :n_read], lost)
        # x minus the sum, in that order (as the hook form): a nearly empty circuit under zero ablation leaves a
        # reader almost nothing, and a fused multiply-add would round that difference differently
        correction = torch.bmm(lost.transpose(1, 2), diff[:, :n_read].reshape(n, n_read, -1))
        return x - correction.view(n, len(readers), *diff.shape[2:])

    def _forward(self, start: int, cells: Sequence[int]) -> List[Tensor]:
        """Each cell's logits at positions ``start..`` (``[batch, pos - start, d_vocab]``), one pass for all."""
        native, trace, plan = self.native, self.trace, self.plan
        n = len(cells)
        batch, n_pos = trace.logits.shape[:2]
        n_new = n_pos - start
        circuit = torch.tensor([self.cells[c].circuit for c in cells], dtype=torch.long)
        ablation = torch.tensor([self.cells[c].ablation for c in cells], dtype=torch.long)
        ablated = plan._ablated_writes[:, :, :, start:]  # [ablations, writers, batch, pos - start, d_model]
        ablation = ablation.to(ablated.device)
        off = plan.off[circuit.to(plan.off.device)].to(ablated.device, ablated.dtype)
        if plan.per_position:
            off = off[..., start:]
        diff = torch.empty((n, ablated.shape[1], batch, n_new, native.d_model), device=ablated.device, dtype=ablated.dtype)
        diff[:, 0] = plan.clean_embed[:, start:] - ablated[ablation, 0]
        x = trace.resid_pre[0][:, start:].repeat(n, 1, 1)  # [cells * batch, pos - start, d_model]

        def rows(t: Tensor) -> Tensor:  # [cells, heads, batch, pos, ...] -> [cells * batch, pos, heads, ...]
            return t.transpose(1, 2).transpose(2, 3).reshape(n * batch, n_new, t.shape[1], *t.shape[4:])

        for l, L in enumerate(native.layers):
            # each reader head's own input, normalised and projected by that head's weights alone
            inputs = self._rewritten(x, off, diff, ("qkv", l))
            h = self._ln1(l, inputs).view(n, -1, batch * n_new, native.d_model)  # [cells, q/k/v heads, rows, d_model]
            out = torch.matmul(h, self.weights[l]).view(n, -1, batch, n_new, native.d_head)  # no copy of h: W broadcasts
            if self.biases[l] is not None:
                out = out + self.biases[l][None, :, None, None]
            q, k, v = (rows(t) for t in out.split([native.n_heads, native.n_kv_heads, native.n_kv_heads], dim=1))
            k_all = torch.cat([trace.k_rot[l][:, :start].repeat(n, 1, 1, 1), native.rotate_k(l, k, start)], dim=1)
            v_all = torch.cat([trace.v[l][:, :start].repeat(n, 1, 1, 1), v], dim=1)
            _, z = native.attend(native.rotate_q(l, q, start), k_all, v_all, start, l)
            first = self.first_head[l]
            heads = torch.einsum("rphe,hem->rphm", z, L.W_O).view(n, batch, n_new, native.n_heads, -1)
            diff[:, first : first + native.n_heads] = heads.permute(0, 3, 1, 2, 4) - ablated[ablation, first : first + native.n_heads]
            attn_out = native.attn_out(l, z)
            base = x if native.parallel else x + attn_out
            mlp_in = self._rewritten(base, off, diff, ("mlp_in", l)).view(base.shape)
            mlp_out = native.mlp(l, mlp_in)
            w = self.mlp_writer[l]
            diff[:, w] = mlp_out.view(n, batch, n_new, -1) - ablated[ablation, w]
            x = x + attn_out + mlp_out if native.parallel else base + mlp_out
        final = self._rewritten(x, off, diff, ("logits", native.n_layers)).view(x.shape)
        logits = native.unembed(native.final_norm(final))
        return list(logits.view(n, batch, n_new, -1).unbind(0))
