"""Faithfulness curves: top-n circuits of any edge score at many sizes, random baselines, CPR and CMD.

Definitions (MIB, Mueller et al. 2025, circuit localization track; its evaluation code
``MIB_circuit_track/evaluation.py``):

- a circuit of size ``n`` keeps the ``n`` edges with the largest score (``|score|`` with
  ``absolute=True``, EAP-IG's ``Graph.apply_topn``); MIB's sizes are the fractions :data:`MIB_SIZES`
  of all edges, ``n = int(fraction * n_edges)``;
- ``m(C)``: the metric of circuit ``C`` with every other edge ablated (``fastpatch.circuits.evaluate``);
- normalised faithfulness ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))``: 0 for the ablated
  model, 1 for the clean model (the empty and full circuits run in the same batched call, under
  each ablation);
- CPR (integrated circuit performance ratio) = the area under ``f`` against the circuit's size,
  higher is better; CMD (integrated circuit-model difference) = the area under ``|1 - f|``, lower
  is better. Areas are trapezoids over the evaluated sizes, in increasing order, with the size as
  the fraction of edges the circuit holds (after pruning); ``log_scale=True`` uses its logarithm
  instead, as MIB's code does by default (the log makes edge counts and fractions give the same
  area; a circuit pruned to no edge counts as one edge there).

Pruning (``prune=True``, EAP-IG's ``Graph.prune`` before each evaluation): repeated until nothing
changes, a head or MLP node is dropped when no circuit edge enters it (into its Q/K/V or MLP
input; on grouped-query models a head's K/V reader is its K/V head) or none of its outgoing edges
reaches a kept reader (the logits are always kept, the embedding always has an input), and every
edge out of or into a dropped node goes with it. Such edges cannot carry anything from the
embedding to the logits.

Random baselines: circuits of the same sizes whose edges are drawn uniformly among all edges
(pruned the same way), evaluated in the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fastpatch.circuits.evaluate import Ablation, evaluate
from fastpatch.engine.edge_plan import EdgeLayout, edge_layout, valid_edges

__all__ = [
    "MIB_SIZES", "FaithfulnessCurve", "edge_counts", "faithfulness_curve", "top_n_circuits", "random_circuits",
    "prune_dangling", "normalised_faithfulness", "areas",
]

#: MIB's circuit sizes, as fractions of all edges.
MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def edge_counts(sizes: Sequence[Union[int, float]], n_items: int) -> List[int]:
    """Edge counts of ``sizes``: a float in ``[0, 1]`` is a fraction of the ``n_items`` edges (``int(f * n)``,
    as MIB rounds), an int a count."""
    counts = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(f"a circuit size is a fraction (float in [0, 1]) or an edge count (int), got {size!r}")
        if isinstance(size, float):
            if not 0.0 <= size <= 1.0:
                raise ValueError(f"a fractional circuit size must lie in [0, 1], got {size}")
            counts.append(int(size * n_items))
        else:
            if not 0 <= size <= n_items:
                raise ValueError(f"a circuit size of {size} edges is outside [0, {n_items}] (the model's edges)")
            counts.append(size)
    if not counts:
        raise ValueError("sizes is empty")
    return counts


def _ranks(keys: Float[Tensor, " items"]) -> Int[Tensor, " items"]:
    """Each item's place when sorted by decreasing key (ties: the earlier item first)."""
    order = torch.sort(keys, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device)
    return ranks


def _circuits_from_ranks(ranks: Tensor, where: Tensor, shape: torch.Size, counts: Sequence[int]) -> Bool[Tensor, "n ..."]:
    out = torch.zeros((len(counts),) + tuple(shape), dtype=torch.bool, device=ranks.device)
    for i, count in enumerate(counts):
        out[i][where] = ranks < count
    return out


def _valid_like(valid: Tensor, scores: Tensor) -> Tensor:
    return valid[..., None].expand_as(scores) if scores.ndim == 3 else valid


def top_n_circuits(
    scores: Float[Tensor, "writer reader *pos"], valid: Bool[Tensor, "writer reader"], counts: Sequence[int],
    absolute: bool = True,
) -> Bool[Tensor, "n writer reader *pos"]:
    """One circuit per count: the ``count`` existing edges (edge-positions) with the largest score
    (``|score|`` with ``absolute``); ties go to the earlier edge in the edge order."""
    where = _valid_like(valid.to(scores.device), scores)
    keys = scores[where].float()
    return _circuits_from_ranks(_ranks(keys.abs() if absolute else keys), where, scores.shape, counts)


def random_circuits(
    valid: Bool[Tensor, "writer reader"], counts: Sequence[int], n_draws: int, seed: int = 0,
    n_pos: Optional[int] = None,
) -> Bool[Tensor, "draws n writer reader *pos"]:
    """``n_draws`` sets of circuits of the sizes ``counts``, each set from one uniform random order of the edges
    (so a draw's circuits are nested, as top-n circuits are); a CPU generator seeded with ``seed``."""
    where = valid if n_pos is None else valid[..., None].expand(-1, -1, n_pos)
    n_items = int(where.sum())
    generator = torch.Generator().manual_seed(seed)
    draws = [
        _circuits_from_ranks(torch.randperm(n_items, generator=generator).to(valid.device), where, where.shape, counts)
        for _ in range(n_draws)
    ]
    return torch.stack(draws) if draws else torch.zeros((0, len(counts)) + tuple(where.shape), dtype=torch.bool)


def _node_maps(layout: EdgeLayout, n_heads: int, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes (each head and MLP, block by block): ``reader_of [R, N]`` (reader r is an input of node n),
    ``writer_of [W, N]`` (writer w is node n's output), and the readers / writers outside any node
    (the logits; the embedding)."""
    nodes = {}
    for w, writer in enumerate(layout.writers):
        if writer.kind != "embed":
            nodes[(writer.kind, writer.layer, writer.head)] = len(nodes)
    n_kv = sum(1 for r in layout.readers if r.component == "k" and r.layer == 0)
    group = n_heads // max(1, n_kv)
    reader_of = torch.zeros(len(layout.readers), len(nodes), device=device)
    for r, reader in enumerate(layout.readers):
        if reader.component == "mlp_in":
            reader_of[r, nodes[("mlp", reader.layer, 0)]] = 1
        elif reader.component == "q":
            reader_of[r, nodes[("head", reader.layer, reader.head)]] = 1
        elif reader.component in ("k", "v"):  # a K/V head feeds every query head of its group
            for h in range(reader.head * group, (reader.head + 1) * group):
                reader_of[r, nodes[("head", reader.layer, h)]] = 1
    writer_of = torch.zeros(len(layout.writers), len(nodes), device=device)
    for w, writer in enumerate(layout.writers):
        if writer.kind != "embed":
            writer_of[w, nodes[(writer.kind, writer.layer, writer.head)]] = 1
    is_logits = torch.tensor([r.component == "logits" for r in layout.readers], device=device)
    is_embed = torch.tensor([w.kind == "embed" for w in layout.writers], device=device)
    return reader_of, writer_of, is_logits, is_embed


def prune_dangling(model_or_cfg: Any, circuits: Bool[Tensor, "n writer reader"]) -> Bool[Tensor, "n writer reader"]:
    """``circuits`` without the edges of heads and MLPs that have no incoming edge or no outgoing edge to a
    kept reader, repeated until nothing changes (EAP-IG's ``Graph.prune``; see the module docstring)."""
    if circuits.ndim != 3:
        raise ValueError(f"prune_dangling takes whole-edge circuits [n, writers, readers], got shape {tuple(circuits.shape)}")
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    reader_of, writer_of, is_logits, is_embed = _node_maps(edge_layout(cfg), int(cfg.n_heads), circuits.device)
    edges = circuits.clone()
    while True:
        has_input = (edges.any(1).float() @ reader_of) > 0  # [n, N]: an edge enters one of the node's readers
        has_output = (edges.any(2).float() @ writer_of) > 0  # [n, N]: an edge leaves the node's writer
        alive = (has_input & has_output).float()
        writer_kept = ((alive @ writer_of.T) > 0) | is_embed  # [n, W]
        reader_kept = ((alive @ reader_of.T) > 0) | is_logits  # [n, R]
        pruned = edges & writer_kept[:, :, None] & reader_kept[:, None, :]
        if torch.equal(pruned, edges):
            return pruned
        edges = pruned


def normalised_faithfulness(
    values: Float[Tensor, "*any"], clean: Float[Tensor, "*batch"], ablated: Float[Tensor, "*batch"]
) -> Float[Tensor, "*any"]:
    """``(m(C) - m(empty)) / (m(full) - m(empty))``; ``clean`` / ``ablated`` broadcast against ``values``' trailing axes."""
    return (values - ablated) / (clean - ablated)


def areas(
    fractions: Float[Tensor, "*batch n_sizes"], faithfulness: Float[Tensor, "*batch n_sizes"], log_scale: bool = False,
    n_items: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """CPR and CMD: trapezoid areas under ``f`` and ``|1 - f|`` against the sizes (in the given order).

    ``log_scale``: against ``log(fraction)``, a fraction of 0 edges counted as ``1 / n_items``."""
    x = fractions.double()
    if log_scale:
        if n_items is None:
            raise ValueError("log_scale needs n_items (a circuit pruned to no edge counts as one edge)")
        x = x.clamp_min(1.0 / n_items).log()
    f = faithfulness.double()
    dx = x[..., 1:] - x[..., :-1]
    cpr = (dx * (f[..., 1:] + f[..., :-1]) / 2).sum(-1)
    gap = (1 - f).abs()
    cmd = (dx * (gap[..., 1:] + gap[..., :-1]) / 2).sum(-1)
    return cpr, cmd


@dataclass
class FaithfulnessCurve:
    """A faithfulness curve per ablation (leading axis ``ablations``), with its random baselines.

    ``counts [n_sizes]``: edges asked for; ``n_edges [n_sizes]`` / ``random_n_edges [n_random, n_sizes]``:
    edges the circuits hold (fewer after pruning); ``fractions``: ``n_edges / n_items``.
    ``values [n_ablations, n_sizes]``, ``random_values [n_ablations, n_random, n_sizes]``: the metric;
    ``clean`` / ``ablated [n_ablations]``: the full and the empty circuit's metric;
    ``faithfulness`` / ``random_faithfulness``: normalised; ``cpr`` / ``cmd [n_ablations]``,
    ``random_cpr`` / ``random_cmd [n_ablations, n_random]``: areas (module docstring).
    ``circuits [n_sizes, writers, readers(, pos)]``: the top-n circuits evaluated.
    """

    ablations: List[str]
    counts: Tensor
    n_items: int
    n_edges: Tensor
    fractions: Tensor
    values: Tensor
    clean: Tensor
    ablated: Tensor
    faithfulness: Tensor
    cpr: Tensor
    cmd: Tensor
    random_n_edges: Tensor
    random_values: Tensor
    random_faithfulness: Tensor
    random_cpr: Tensor
    random_cmd: Tensor
    circuits: Tensor


def _ablation_name(ablation: Ablation) -> str:
    return ablation if isinstance(ablation, str) else str(getattr(ablation, "kind", type(ablation).__name__))


def faithfulness_curve(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Optional[Int[Tensor, "batch pos"]],
    metric: Any,
    scores: Any,
    *,
    sizes: Sequence[Union[int, float]] = MIB_SIZES,
    ablation: Union[Ablation, Sequence[Ablation]] = "corrupted",
    method: str = "topn",
    n_random: int = 1,
    prune: bool = False,
    absolute: bool = True,
    log_scale: bool = False,
    seed: int = 0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = False,
) -> FaithfulnessCurve:
    """The faithfulness curve of the top-n circuits of ``scores`` at ``sizes``, under each ablation, with
    ``n_random`` random baselines, all in one batched ``evaluate`` call.

    Args:
        scores: edge scores ``[n_writers, n_readers]`` (or ``[..., pos]``) in the edge order of
            ``fastpatch.attribution.get_attr_patch_edges``, or its ``EdgeScores`` (attribution,
            ``exact_edges``, or any user score in that layout).
        sizes: fractions of all edges (floats, MIB's by default) and/or edge counts (ints).
        ablation, backend, chunk_size, memory_budget, progress: as :func:`fastpatch.circuits.evaluate`.
        metric: a scalar metric of the logits (the mean over prompts, as MIB averages).
        method: ``"topn"`` (the ``n`` best edges) or ``"greedy"`` (EAP-IG's greedy search from the
            logits, ``fastpatch.circuits.discovery.greedy_circuits``; whole-edge scores).
        n_random: random circuits per size (0: none).
        prune: drop dangling edges before evaluating (module docstring; whole-edge scores only).
        absolute: rank edges by ``|score|`` (MIB's default) rather than by signed score.
        log_scale: areas against the log of the size (MIB's code) rather than the size.
        seed: the random circuits' and resample ablation's seed.

    Raises:
        ValueError: bad sizes, scores of the wrong shape, ``prune`` with per-position scores,
            ``n_random < 0``, or any of :func:`fastpatch.circuits.evaluate`'s refusals.
    """
    if method not in ("topn", "greedy"):
        raise ValueError(f"method must be 'topn' or 'greedy', got {method!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be a non-negative integer, got {n_random!r}")
    layout = edge_layout(model.cfg)
    valid = valid_edges(model.cfg, layout)
    score = getattr(scores, "scores", scores)
    if not isinstance(score, Tensor) or score.ndim not in (2, 3) or tuple(score.shape[:2]) != tuple(valid.shape):
        raise ValueError(
            f"scores must be edge scores [{valid.shape[0]}, {valid.shape[1]}] (or [..., pos]) or EdgeScores, "
            f"got {tuple(getattr(score, 'shape', ())) or type(score).__name__}"
        )
    per_position = score.ndim == 3
    if per_position and (prune or method == "greedy"):
        raise ValueError(f"{'prune=True' if prune else 'greedy'} needs whole-edge scores: nodes and their edges have no positions")
    device = score.device
    valid = valid.to(device)
    n_pos = int(score.shape[2]) if per_position else None
    n_items = int(valid.sum()) * (n_pos or 1)
    counts = edge_counts(sizes, n_items)
    order = sorted(range(len(counts)), key=lambda i: counts[i])  # areas run over increasing sizes
    if method == "greedy":
        from fastpatch.circuits.discovery import greedy_circuits  # discovery builds on this module's node maps

        top = greedy_circuits(model, score, counts, absolute)
    else:
        top = top_n_circuits(score, valid, counts, absolute)
    rand = random_circuits(valid, counts, n_random, seed, n_pos).to(device)
    if prune:
        top = prune_dangling(model, top)
        rand = prune_dangling(model, rand.flatten(0, 1)).view_as(rand) if n_random else rand
    full = valid if n_pos is None else valid[..., None].expand(-1, -1, n_pos)
    stack = torch.cat([torch.zeros_like(full)[None], full[None], top, rand.flatten(0, 1)])
    several = isinstance(ablation, (list, tuple))
    ablations = list(ablation) if several else [ablation]
    values = evaluate(
        model, clean_tokens, corrupted_tokens, metric, stack, ablation=ablations, seed=seed, backend=backend,
        chunk_size=chunk_size, memory_budget=memory_budget, progress=progress,
    )  # [ablations, 2 + sizes + random * sizes]
    ablated, clean = values[:, 0], values[:, 1]
    n_sizes = len(counts)
    top_values = values[:, 2 : 2 + n_sizes]
    random_values = values[:, 2 + n_sizes :].reshape(len(ablations), n_random, n_sizes)
    faith = normalised_faithfulness(top_values, clean[:, None], ablated[:, None])
    random_faith = normalised_faithfulness(random_values, clean[:, None, None], ablated[:, None, None])
    dims = tuple(range(1, top.ndim))
    n_edges = top.sum(dims)
    random_n_edges = rand.sum(tuple(range(2, rand.ndim))) if n_random else torch.zeros(0, n_sizes, dtype=torch.long)
    fractions = n_edges.float() / n_items
    idx = torch.tensor(order, device=values.device)
    cpr, cmd = areas(fractions.to(values.device)[idx], faith[:, idx], log_scale, n_items)
    random_fractions = random_n_edges.float().to(values.device) / n_items
    random_cpr, random_cmd = areas(random_fractions[:, idx], random_faith[..., idx], log_scale, n_items)
    return FaithfulnessCurve(
        ablations=[_ablation_name(a) for a in ablations], counts=torch.tensor(counts), n_items=n_items,
        n_edges=n_edges, fractions=fractions, values=top_values, clean=clean, ablated=ablated, faithfulness=faith,
        cpr=cpr.float(), cmd=cmd.float(), random_n_edges=random_n_edges, random_values=random_values,
        random_faithfulness=random_faith, random_cpr=random_cpr.float(), random_cmd=random_cmd.float(), circuits=top,
    )
