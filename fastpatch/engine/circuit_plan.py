"""Circuit evaluation as a plan: one cell per (circuit, ablation), every edge outside the circuit ablated.

A circuit is a boolean mask over the edge grid of ``engine.edge_plan`` (``[n_writers, n_readers]``,
or ``[n_writers, n_readers, pos]`` per position). A cell runs the *clean* prompts with every
reader's input rewritten (MIB / EAP-IG ``evaluate_graph`` semantics)::

    reader_in = reader_in - sum over writers w not in the circuit for this reader (at this position)
                            of (w's output in this run - w's output in the ablated run)

so a reader sees the ablated output of every writer outside the circuit and this run's output of
every writer inside it. "This run" is the patched run itself: a writer's output changes when
the readers upstream of it were rewritten. The empty circuit is the ablated model (every reader
sees only ablated writes plus the biases and positional embeddings both runs share), the full
circuit the clean model.

Hook backend: one forward on the clean tokens repeated once per cell. Writer hooks (``hook_embed``,
``hook_z`` as ``z[:, :, h] @ W_O[h]`` per head, ``hook_mlp_out``) record each cell's
this-run-minus-ablated output in a ``[cells, batch, pos, n_writers, d_model]`` buffer; reader
hooks (the per-head ``hook_{q,k,v}_input`` fork, ``ln2.hook_in``, ``ln_final.hook_in``) subtract
the masked sum of that buffer, one contraction per hook point for all cells and readers of it.
Writers always fire before the readers that read them, so the buffer holds every write a reader
needs when its hook runs (checked). Identical circuits run once; a circuit that keeps every edge
(the clean run) runs under one ablation.

Native backend (``engine.native.circuit``): the same rewrite in a functional forward of the cells'
rows, with no per-head fork needed; each cell computes only the positions from the first where a
writer outside its circuit writes differently in the clean and the ablated run (the shared prefix of
clean and corrupted prompts is the clean trace's, computed once), and a cell that changes nothing is
the clean run. Not run natively: models whose Q/K/V fork takes the rewrite after ``ln1`` (BLOOM),
where only hooks give the hook form's values.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastpatch._tl_private import split_qkv_input
from fastpatch.engine.checks import cached_activation, check_cached_activation
from fastpatch.engine.chunks import ChunkBudget
from fastpatch.engine.direct_path import PathPlan, Writer
from fastpatch.engine.edge_plan import EdgeLayout, edge_layout, valid_edges
from fastpatch.engine.native.circuit import NativeCircuits
from fastpatch.engine.native.model import NativeEngine
from fastpatch.engine.plan import NativeWork, PatchPlan
from fastpatch.engine.probing import NoQKVFork, post_norm_qkv_forks, require_qkv_input_forks

_QKV = ("q", "k", "v")


class CircuitCell(NamedTuple):
    """Circuit ``circuit`` (its number in the stack) evaluated with ablation ``ablation``."""

    circuit: int
    ablation: int


def writer_outputs(model: Any, acts: Mapping[str, Tensor], writers: Sequence[Writer]) -> Float[Tensor, "writer batch pos d_model"]:
    """Every writer's residual write in one run (``acts``: hook name -> activation), heads as ``z[:, :, h] @ W_O[h]``."""
    out = []
    for writer in writers:
        act = acts[writer.hook_name]
        out.append(act[:, :, writer.head] @ model.blocks[writer.layer].attn.W_O[writer.head] if writer.kind == "head" else act)
    return torch.stack(out)


def bytes_per_row(cfg: Any, n_pos: int, n_writers: int, dtype_bytes: int) -> int:
    """Memory one batch row adds to a hooked forward here: the write buffer, its ablated twin and a reader correction."""
    return 3 * n_writers * n_pos * int(cfg.d_model) * dtype_bytes


class CircuitPlan(PatchPlan):
    """Every circuit of ``circuits`` under every ablation of ``ablated``, run on ``tokens`` (the clean prompts).

    ``circuits``: ``[n_circuits, n_writers, n_readers]`` or ``[n_circuits, n_writers, n_readers, pos]``
    (per position) boolean masks in the edge order of ``engine.edge_plan``, only on existing edges.
    ``ablated``: one activation cache per ablation holding every writer's hook (``hook_embed``,
    ``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_mlp_out``), from a run on prompts paired one to
    one with ``tokens`` (or a one-row broadcast, as zero and mean ablation caches are).
    """

    label = "circuits"
    unit = "circuit"

    def __init__(
        self, model: Any, tokens: Tensor, circuits: Bool[Tensor, "circuit writer reader *pos"], ablated: Sequence[Mapping],
        budget: Optional[ChunkBudget] = None, dtype_bytes: int = 4,
    ):
        cfg = model.cfg
        self.budget, self.dtype_bytes = budget, dtype_bytes
        self.layout: EdgeLayout = edge_layout(cfg)
        self.valid = valid_edges(cfg, self.layout)
        self.model, self.tokens, self.ablated = model, tokens, list(ablated)
        self.per_position = circuits.ndim == 4
        # each distinct circuit runs once (MIB's small sizes often round to the same circuit), and one
        # that keeps every edge is the clean run under any ablation: it runs under the first only
        unique, self.inverse = torch.unique(circuits.flatten(1).to(torch.uint8), dim=0, return_inverse=True)
        unique = unique.bool().view(-1, *circuits.shape[1:])
        # off[c, w, r(, p)] = 1 where the edge exists and circuit c leaves it out: the writes a reader loses
        valid = self.valid.to(circuits.device)
        self.off = (valid[(None, ...) + ((None,) if self.per_position else ())] & ~unique).float()
        keeps_all = (~self.off.flatten(1).bool().any(1)).tolist()
        self._cells = [
            CircuitCell(c, a) for a in range(len(self.ablated)) for c in range(len(unique)) if a == 0 or not keeps_all[c]
        ]
        # hook point -> the readers it holds, in the order of its head axis
        self._reader_groups: Dict[str, List[int]] = defaultdict(list)
        for r, reader in enumerate(self.layout.readers):
            self._reader_groups[PathPlan._reader_hook_name(reader.component, reader.layer)].append(r)
        # hook point -> how many writers (a prefix of the writer order) its readers read: the rest are
        # later writers, whose writes it never subtracts, so its masked sum skips them
        self._n_read: Dict[str, int] = {
            name: int(torch.nonzero(self.valid[:, readers].any(1)).max()) + 1 for name, readers in self._reader_groups.items()
        }
        self._ablated_writes: Optional[Tensor] = None
        self.clean_embed: Optional[Tensor] = None  # the clean run's hook_embed (native backend)
        after_norm = post_norm_qkv_forks(model, sorted({r.layer for r in self.layout.readers if r.component in _QKV}))
        if after_norm:  # the hook form's fork rewrites the input after ln1 there (BLOOM): only hooks give its values
            self.native_unsupported = f"Q/K/V readers in blocks {after_norm} take the rewrite after the norm"
        # an MLP or the logits without an input hook of their own (an MLP sharing the attention's norm: Phi, Falcon;
        # no pre-MLP norm: OLMo 2): the hook form cannot rewrite that reader, and nothing checks a native value there
        hook_dict = getattr(model, "hook_dict", None) or {}
        absent = [name for name in self._reader_groups if not name.endswith("_input") and name not in hook_dict]
        self.missing_readers: Optional[str] = None
        if absent:
            self.missing_readers = (
                f"circuit evaluation rewrites each MLP's and the final norm's input at its hook point, and this model "
                f"has no {absent[0]}{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}: its MLP reads the "
                "attention's norm or has no norm of its own, which the reader semantics do not cover yet"
            )
            self.native_unsupported = self.missing_readers

    def table(self, values: Float[Tensor, "cells ..."]) -> Float[Tensor, "ablation circuit ..."]:
        """The cells' values as ``[n_ablations, n_circuits, ...]`` in the order of the circuits given."""
        where = {cell: i for i, cell in enumerate(self._cells)}
        rows = [
            [where.get(CircuitCell(c, a), where[CircuitCell(c, 0)]) for c in self.inverse.tolist()]
            for a in range(len(self.ablated))
        ]
        return values[torch.tensor(rows, device=values.device)]

    def hook_macs_per_position(self) -> int:
        """Multiply-adds of the reader hooks' masked sums per batch row and position (for FLOP counts)."""
        return sum(self._n_read[name] * len(readers) for name, readers in self._reader_groups.items()) * int(self.model.cfg.d_model)

    @property
    def cells(self) -> List[CircuitCell]:
        return self._cells

    def prepare(self, engine: Optional[NativeEngine] = None) -> None:
        if self.missing_readers is not None:
            raise ValueError(self.missing_readers)
        layers = sorted({r.layer for r in self.layout.readers if r.component in _QKV})
        try:
            for component in _QKV if engine is None else ():  # the native forward needs no fork
                require_qkv_input_forks(self.model, layers, component)
        except NoQKVFork as error:  # the same refusal, pointing to the native form
            raise NoQKVFork(
                f"circuit evaluation on the hook backend rewrites each head's Q/K/V input at its per-head fork, which "
                f"this model lacks: {str(error).split(', so ')[0]}; the native backend (backend='native') needs none"
            ) from error
        if engine is not None:  # the embedding writer's clean output: the one writer the native trace lacks
            _, cache = self.model.run_with_cache(self.tokens, stop_at_layer=0, names_filter=["hook_embed"])
            self.clean_embed = cached_activation(cache, "hook_embed", "the clean run")
        names = list(dict.fromkeys(w.hook_name for w in self.layout.writers))
        writes = []
        for number, cache in enumerate(self.ablated):
            what = f"ablation {number}"
            acts = {name: cached_activation(cache, name, what) for name in names}
            for name, act in acts.items():
                check_cached_activation(act, name, self.tokens, what=what)
            writes.append(writer_outputs(self.model, acts, self.layout.writers).expand(-1, *self.tokens.shape, -1))
        self._ablated_writes = torch.stack(writes)  # [ablations, writers, batch, pos, d_model]

    def hooks_context(self):
        return split_qkv_input(self.model)

    def patched_logits(self, cells: Sequence[CircuitCell]) -> Tensor:
        """Each cell's circuit run in its own ``batch`` rows of one forward on the clean tokens."""
        model, layout = self.model, self.layout
        n, (batch, n_pos) = len(cells), self.tokens.shape
        device = self._ablated_writes.device
        circuit = torch.tensor([c.circuit for c in cells], device=self.off.device)
        ablation = torch.tensor([c.ablation for c in cells], device=device)
        off = self.off[circuit].to(device)  # [cells, writers, readers(, pos)]
        # this run's output minus the ablated one, writer-major so each reader's sum is one batched matmul
        # every slot is written by its writer's hook before a reader reads it (checked in the reader hooks)
        diff = torch.empty((n, len(layout.writers), batch, n_pos, self._ablated_writes.shape[-1]), device=device,
                           dtype=self._ablated_writes.dtype)
        recorded = [False] * len(layout.writers)
        fired: List[str] = []

        def record(name: str, first: int, count: int):
            def hook(act: Tensor, hook: Any) -> None:
                fired.append(name)
                if name.endswith("hook_z"):  # [rows, pos, heads, d_head] -> per-head writes [rows, pos, heads, d_model]
                    W_O = model.blocks[layout.writers[first].layer].attn.W_O
                    out = torch.einsum("rphe,hem->rphm", act, W_O).reshape(n, batch, n_pos, count, -1).permute(0, 3, 1, 2, 4)
                else:
                    out = act.reshape(n, 1, batch, n_pos, -1)
                diff[:, first : first + count] = out - self._ablated_writes[ablation, first : first + count]
                recorded[first : first + count] = [True] * count

            return hook

        def rewrite(name: str, readers: List[int]):
            qkv = name.endswith("_input")
            n_read = self._n_read[name]

            def hook(act: Tensor, hook: Any) -> Tensor:
                fired.append(name)
                if not all(recorded[:n_read]):  # a reader hook running before a writer it reads: hook order broken
                    raise NotImplementedError(f"{name} ran before the hooks of every writer it reads")
                lost = off[:, :n_read, readers]  # [cells, writers read, readers(, pos)]
                if self.per_position:
                    correction = torch.einsum("cwbpd,cwrp->crbpd", diff[:, :n_read], lost)
                else:  # [cells, readers, writers] @ [cells, writers, batch * pos * d_model]
                    correction = torch.bmm(lost.transpose(1, 2), diff[:, :n_read].reshape(n, n_read, -1))
                correction = correction.reshape(n, len(readers), batch, n_pos, -1).to(act.dtype)
                if qkv:  # act [rows, pos, readers, d_model]: subtract through a view, no reordered copy
                    return (act.reshape(n, batch, n_pos, len(readers), -1) - correction.permute(0, 2, 3, 1, 4)).view(act.shape)
                return act - correction.reshape(act.shape)

            return hook

        hooks = []
        writers = layout.writers
        w = 0
        while w < len(writers):  # the heads of a layer share one hook point: record them together
            count = 1
            while w + count < len(writers) and writers[w + count].hook_name == writers[w].hook_name:
                count += 1
            hooks.append((writers[w].hook_name, record(writers[w].hook_name, w, count)))
            w += count
        hooks += [(name, rewrite(name, readers)) for name, readers in self._reader_groups.items()]
        logits = model.run_with_hooks(self.tokens.repeat(n, 1), fwd_hooks=hooks)
        missing = {name for name, _ in hooks} - set(fired)
        if missing:  # an unfired hook would leave its writes unrecorded or its readers unablated
            raise NotImplementedError(f"{sorted(missing)} did not fire: the model has no such writer or reader hook")
        return logits

    def native_work(self, engine: NativeEngine, cells: Sequence[CircuitCell]) -> NativeWork:
        """Cells grouped by first changed position, each chunk one native pass (``native.circuit``)."""
        budget = self.budget or ChunkBudget.from_options(None, None, self._ablated_writes.device)
        return NativeCircuits(engine, self, cells, budget, self.dtype_bytes).work()

