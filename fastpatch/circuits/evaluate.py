"""Batched circuit evaluation: the metric of many circuits, each with every edge outside it ablated.

Semantics are MIB's / EAP-IG's ``evaluate_graph`` (Hanna et al., "Have Faith in Faithfulness",
2024; Mueller et al., "MIB: A Mechanistic Interpretability Benchmark", 2025): on the clean prompts,
every reader's input (each head's Q, K and V input, each MLP input, the logits) is replaced by its
input in that same run minus, for every writer (embedding, head ``z @ W_O``, MLP) whose edge into
that reader is not in the circuit, the writer's output in that run minus its output in the ablated
run. The empty circuit is the ablated model, the full circuit the clean model.

The embedding writer is the token embedding (``hook_embed``), as in ``exact_edges``: learned
positional embeddings and the attention/MLP output biases are in no writer, so they stay in every
reader's input under every ablation. (EAP-IG's input node is ``embed + pos_embed``; its zero
ablation also removes the positional embedding, so on GPT-2-style models zero-ablation numbers
differ from EAP-IG's there; corrupted, mean and resample ablation agree, positions being equal.)

Circuits are stacked along the batch dimension (``engine.circuit_plan.CircuitPlan``, one row block per
distinct (circuit, ablation)) and chunked to the memory budget by the batched driver (``engine.driver.run_plan``),
on the hook backend (one hooked forward per chunk) or the native one (``engine.native.circuit``: a
functional forward per chunk of cells sharing a first changed position; positions before it, such as
the prefix clean and corrupted prompts share, are the clean run's, computed once).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fastpatch.engine.backend_choice import BACKENDS
from fastpatch.engine.checks import check_tokens, require_eval_mode
from fastpatch.engine.chunks import ChunkBudget, forward_bytes_per_row
from fastpatch.engine.circuit_plan import CircuitPlan, bytes_per_row
from fastpatch.engine.driver import RunOptions, model_device, run_plan
from fastpatch.engine.edge_plan import edge_layout, valid_edges
from fastpatch.engine.metric_set import MetricFn, MetricSet
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.sources import mean_ablation, resample_ablation, zero_ablation

__all__ = ["ABLATIONS", "evaluate", "full_circuit", "ablation_caches"]

ABLATIONS = ("corrupted", "zero", "mean", "resample")
Ablation = Union[str, Mapping[str, Tensor]]


def writer_hook_names(cfg: Any) -> List[str]:
    """The hooks holding every writer's output: ``hook_embed``, each block's ``hook_z`` and ``hook_mlp_out``."""
    return ["hook_embed"] + [f"blocks.{l}.{h}" for l in range(int(cfg.n_layers)) for h in ("attn.hook_z", "hook_mlp_out")]


def full_circuit(model: Any, n_pos: Optional[int] = None) -> Bool[Tensor, "writer reader *pos"]:
    """Every existing edge: ``[n_writers, n_readers]`` (``[..., n_pos]`` per position), the edge order of
    ``fastpatch.attribution.get_attr_patch_edges`` and ``exact_edges``."""
    valid = valid_edges(model.cfg, edge_layout(model.cfg))
    return valid if n_pos is None else valid[..., None].expand(-1, -1, n_pos).clone()


def ablation_caches(
    model: Any, ablations: Sequence[Ablation], clean_tokens: Tensor, corrupted_tokens: Optional[Tensor], seed: int = 0
) -> List[Mapping[str, Tensor]]:
    """One cache of every writer's ablated output per ablation (a kind of :data:`ABLATIONS`, or a cache as given).

    ``"corrupted"``: a run on ``corrupted_tokens``; ``"zero"``: 0; ``"mean"``: the mean over the clean
    prompts at each position; ``"resample"``: another clean prompt's, permuted with ``seed``
    (``fastpatch.sources``). For other reference prompts pass a ``fastpatch.sources`` cache built on them.
    """
    names = writer_hook_names(model.cfg)
    caches: List[Mapping[str, Tensor]] = []
    for ablation in ablations:
        if not isinstance(ablation, str):
            if not isinstance(ablation, Mapping) and not hasattr(ablation, "__getitem__"):
                raise ValueError(f"an ablation is one of {ABLATIONS} or an activation cache, got {type(ablation).__name__}")
            caches.append(ablation)
        elif ablation == "corrupted":
            if corrupted_tokens is None:
                raise ValueError("ablation='corrupted' needs corrupted_tokens")
            with preserved_model_state(model), torch.no_grad():
                _, cache = model.run_with_cache(corrupted_tokens, names_filter=lambda name: name in names)
            caches.append(cache)
        elif ablation == "zero":
            caches.append(zero_ablation(model, clean_tokens, names_filter=names))
        elif ablation == "mean":
            caches.append(mean_ablation(model, clean_tokens, names_filter=names))
        elif ablation == "resample":
            caches.append(resample_ablation(model, clean_tokens, seed=seed, names_filter=names))
        else:
            raise ValueError(f"ablation must be one of {ABLATIONS} or an activation cache, got {ablation!r}")
    return caches


def check_circuits(model: Any, circuits: Any, n_pos: int) -> None:
    """A stack of boolean edge masks on existing edges, ``[n, n_writers, n_readers]`` or ``[n, ..., pos]``."""
    layout = edge_layout(model.cfg)
    grid = (len(layout.writers), len(layout.readers))
    if not isinstance(circuits, Tensor) or circuits.dtype != torch.bool:
        raise ValueError(f"circuits must be a boolean tensor of edge masks, got {getattr(circuits, 'dtype', type(circuits).__name__)}")
    if circuits.ndim not in (3, 4) or tuple(circuits.shape[1:3]) != grid or (circuits.ndim == 4 and circuits.shape[3] != n_pos):
        raise ValueError(
            f"circuits must have shape [n_circuits, {grid[0]}, {grid[1]}] (writers x readers of this model) or "
            f"[n_circuits, {grid[0]}, {grid[1]}, {n_pos}] per position; got {tuple(circuits.shape)}"
            + ("; add a circuit axis with circuits[None]" if circuits.ndim == 2 else "")
        )
    if circuits.shape[0] == 0:
        raise ValueError("circuits holds no circuit")
    valid = valid_edges(model.cfg, layout, circuits.device)
    outside = circuits & ~(valid[..., None] if circuits.ndim == 4 else valid)
    if outside.any():
        c, w, r = torch.nonzero(outside)[0].tolist()[:3]
        raise ValueError(
            f"circuit {c} holds the edge {layout.writer_names[w]} -> {layout.reader_names[r]}, which does not exist "
            "(the reader does not read the writer); mask circuits with fastpatch.circuits.full_circuit(model)"
        )


def evaluate(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Optional[Int[Tensor, "batch pos"]],
    metric: MetricFn,
    circuits: Bool[Tensor, "n_circuits writer reader *pos"],
    *,
    ablation: Union[Ablation, Sequence[Ablation]] = "corrupted",
    reduce: str = "scalar",
    seed: int = 0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = False,
) -> Float[Tensor, "*n_ablations n_circuits *batch"]:
    """The metric of each circuit with every edge outside it ablated (MIB / EAP-IG ``evaluate_graph``).

    Args:
        model: a TransformerLens model in eval mode.
        clean_tokens: ``[batch, pos]`` the prompts every circuit runs on.
        corrupted_tokens: ``[batch, pos]`` paired prompts, the source of ``ablation="corrupted"``
            (``None`` when no ablation needs them).
        metric: ``logits [batch, pos, d_vocab] -> 0-d tensor`` (``[batch]`` with ``reduce="none"``),
            e.g. a ``fastpatch.metrics`` metric.
        circuits: ``[n_circuits, n_writers, n_readers]`` boolean masks in the edge order of
            ``fastpatch.attribution.get_attr_patch_edges`` / ``exact_edges`` (True: the edge is kept),
            or ``[n_circuits, n_writers, n_readers, pos]`` per position (the edge is kept at that
            position of the reader's input). Only existing edges (``full_circuit(model)``).
            Grouped-query models: K/V readers are K/V heads.
        ablation: what an edge outside the circuit carries instead of its writer's output: one of
            ``"corrupted"`` (the corrupted run), ``"zero"``, ``"mean"`` (over the clean prompts, per
            position), ``"resample"`` (another clean prompt, permuted with ``seed``), or a cache of
            the writers' hooks (e.g. a ``fastpatch.sources`` cache of other prompts); a list of them
            evaluates every circuit under each in the same batched run.
        reduce: ``"scalar"`` (one value per circuit) or ``"none"`` (per prompt).
        backend: ``"auto"`` (native where the native engine runs the model and gives the hook form's
            values, else hooks with a one-time warning), ``"native"`` (raises where it cannot run) or ``"hooks"``
            (needs TransformerLens's per-head Q/K/V input fork).
        chunk_size, memory_budget, progress: as every ``fastpatch.patching`` sweep; the budget counts
            this plan's per-row buffers (each writer's output difference, the per-head inputs) besides the forward.

    Returns:
        ``[n_circuits]`` (``[n_circuits, batch]`` with ``reduce="none"``); with a list of ablations a
        leading ``[n_ablations]`` axis. float32 on the model's device.

    Raises:
        ValueError: bad tokens, circuits (shape, dtype, an edge that does not exist), ablation, reduce,
            backend or metric output; a model in training mode; a model whose MLP or final norm input has
            no hook point (an MLP sharing the attention's norm, as Phi, Falcon and GPT-J; OLMo 2).
    """
    require_eval_mode(model, operation="circuits.evaluate()")
    check_tokens(model, clean_tokens, "clean_tokens")
    if corrupted_tokens is not None:
        check_tokens(model, corrupted_tokens, "corrupted_tokens")
        if corrupted_tokens.shape != clean_tokens.shape:
            raise ValueError(
                f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens {tuple(corrupted_tokens.shape)} must "
                "have the same shape: the corrupted run's writes replace the clean run's prompt by prompt"
            )
    if reduce not in ("scalar", "none"):
        raise ValueError(f"reduce must be 'scalar' or 'none', got {reduce!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not callable(metric):
        raise ValueError(f"metric must be a callable of the logits, got {type(metric).__name__}")
    batch, n_pos = clean_tokens.shape
    check_circuits(model, circuits, int(n_pos))
    several = isinstance(ablation, (list, tuple))
    ablations = list(ablation) if several else [ablation]
    if not ablations:
        raise ValueError("ablation is an empty list")
    caches = ablation_caches(model, ablations, clean_tokens, corrupted_tokens, seed)
    device = model_device(model, clean_tokens)
    dtype_bytes = torch.finfo(getattr(model.cfg, "dtype", torch.float32) or torch.float32).bits // 8
    budget = ChunkBudget.from_options(chunk_size, memory_budget, device)
    plan = CircuitPlan(model, clean_tokens, circuits, caches, budget, dtype_bytes)
    if plan.missing_readers is not None:  # no backend defines these readers: refused before any fallback warning
        raise ValueError(plan.missing_readers)
    # the hook backend's chunks: its forward and this plan's per-row buffers (the native one sizes its own)
    per_row = forward_bytes_per_row(model.cfg, int(n_pos), dtype_bytes) + bytes_per_row(
        model.cfg, int(n_pos), len(plan.layout.writers), dtype_bytes
    )
    options = RunOptions(backend, budget.cells_per_chunk(per_row, int(batch)), None, progress)
    values = plan.table(run_plan(model, clean_tokens, plan, MetricSet(metric, reduce, int(batch)), options).cells[:, 0])
    return values if several else values[0]
