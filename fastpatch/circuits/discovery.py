"""Circuit discovery: greedy circuits from any edge score, and an exact ACDC-style search with batched candidates.

- :func:`greedy_circuits`: EAP-IG's ``Graph.apply_greedy`` (MIB's greedy circuits): start from the
  logits; repeatedly add the highest-scoring edge (``|score|`` with ``absolute``) whose reader's
  node is in the circuit; when the edge's writer is a node not yet in it, that node joins and the
  edges into its readers become candidates. One greedy order gives every size (its prefixes).
  Nodes as in ``faithfulness.prune_dangling`` (a grouped-query K/V reader feeds every query head
  of its group; the embedding has no incoming edge).
- :func:`acdc`: Conmy et al.'s ACDC ("Towards Automated Circuit Discovery", 2023) on the exact
  circuit metric (``fastpatch.circuits.evaluate``): readers from the logits back (reverse
  topological order: the edge layout's readers reversed), and for each reader its incoming edges
  from the latest writer to the earliest; an edge is removed when removing it from the current
  circuit changes the metric by less than ``threshold`` (``metric(without) - metric(current) <
  threshold``; the metric is a loss, the KL divergence from the clean model's output at the last
  position by default, as ACDC). The candidate removals into one reader are evaluated in one
  batched pass: circuit ``i`` of the pass is the current circuit without the reader's first ``i``
  remaining candidates, which is exactly what the sequential walk evaluates as long as it keeps
  removing (ACDC removes most edges); at the first candidate it keeps, the walk continues with a
  new pass from there. Decisions equal the sequential search (one forward per candidate): passes
  per reader = 1 + the edges it keeps. A reader whose node has no outgoing edge left is skipped:
  its input cannot reach the output, so every edge into it changes the metric by exactly 0 and is
  removed (``threshold`` must be positive).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Set

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fastpatch.circuits.evaluate import Ablation, ablation_caches, evaluate
from fastpatch.circuits.faithfulness import _node_maps
from fastpatch.engine.edge_plan import edge_layout, valid_edges

__all__ = ["greedy_circuits", "greedy_order", "acdc", "AcdcResult"]


def greedy_order(model_or_cfg: Any, scores: Float[Tensor, "writer reader"], absolute: bool = True) -> List[tuple]:
    """Every reachable edge ``(writer, reader)`` in the order EAP-IG's greedy search adds them (ties: edge order)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    layout = edge_layout(cfg)
    valid = valid_edges(cfg, layout)
    if tuple(scores.shape) != tuple(valid.shape):
        raise ValueError(f"scores must be whole-edge scores {tuple(valid.shape)}, got {tuple(scores.shape)}")
    reader_of, writer_of, is_logits, _ = _node_maps(layout, int(cfg.n_heads), torch.device("cpu"))
    keys = (scores.detach().float().abs() if absolute else scores.detach().float()).cpu()
    n_readers = valid.shape[1]
    node_readers = [torch.nonzero(reader_of[:, n]).flatten().tolist() for n in range(reader_of.shape[1])]
    writer_node = [int(torch.nonzero(writer_of[w]).flatten()[0]) if writer_of[w].any() else None for w in range(valid.shape[0])]
    heap: List[tuple] = []
    pushed: Set[int] = set()

    def push_reader(r: int) -> None:
        if r in pushed:
            return
        pushed.add(r)
        for w in torch.nonzero(valid[:, r]).flatten().tolist():
            heapq.heappush(heap, (-float(keys[w, r]), w * n_readers + r))

    for r in torch.nonzero(is_logits).flatten().tolist():
        push_reader(r)
    in_circuit: Set[int] = set()
    order = []
    while heap:
        _, flat = heapq.heappop(heap)
        w, r = divmod(flat, n_readers)
        order.append((w, r))
        node = writer_node[w]
        if node is not None and node not in in_circuit:
            in_circuit.add(node)
            for reader in node_readers[node]:
                push_reader(reader)
    return order


def greedy_circuits(
    model_or_cfg: Any, scores: Float[Tensor, "writer reader"], counts: Sequence[int], absolute: bool = True
) -> Bool[Tensor, "n writer reader"]:
    """Greedy circuits of ``counts`` edges each (EAP-IG's ``apply_greedy``; prefixes of one greedy order).

    A count above the number of edges the search reaches (every edge reachable from the logits) raises."""
    order = greedy_order(model_or_cfg, scores, absolute)
    out = torch.zeros((len(counts),) + tuple(scores.shape), dtype=torch.bool)
    for i, count in enumerate(counts):
        if count > len(order):
            raise ValueError(f"a greedy circuit of {count} edges: only {len(order)} edges are reachable from the logits")
        if count:
            w, r = zip(*order[:count])
            out[i, list(w), list(r)] = True
    return out.to(scores.device)


@dataclass
class AcdcResult:
    """``circuit [writers, readers]``: the edges kept; ``metric``: its metric; ``passes``: batched
    evaluations run; ``candidates``: circuits evaluated (a sequential search runs one forward per
    edge it visits: ``visited``); ``log``: ``(writer, reader, change, removed)`` per visited edge."""

    circuit: Tensor
    metric: float
    passes: int = 0
    candidates: int = 0
    visited: int = 0
    log: List[tuple] = field(default_factory=list)


def acdc(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Optional[Int[Tensor, "batch pos"]],
    threshold: float,
    *,
    metric: Any = None,
    ablation: Ablation = "corrupted",
    start: Optional[Bool[Tensor, "writer reader"]] = None,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> AcdcResult:
    """ACDC-style exact circuit search (module docstring): edges whose removal changes ``metric`` by less than ``threshold``.

    Args:
        threshold: a positive number (ACDC's tau), in the metric's units.
        metric: a scalar loss of the logits (lower is better); default: the KL divergence of the
            circuit's next-token distribution from the clean model's at the last position
            (``fastpatch.metrics.KLDivergence``), ACDC's default.
        ablation: one ablation (see :func:`fastpatch.circuits.evaluate`).
        start: the circuit the search starts from (default: every edge).

    Raises:
        ValueError: a threshold that is not a positive number, ``start`` of the wrong shape, or
            :func:`fastpatch.circuits.evaluate`'s refusals.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if isinstance(ablation, (list, tuple)):
        raise ValueError("acdc searches under one ablation; pass one kind or cache")
    cfg = model.cfg
    layout = edge_layout(cfg)
    valid = valid_edges(cfg, layout)
    if metric is None:
        from fastpatch.metrics import KLDivergence

        with torch.no_grad():
            metric = KLDivergence(model(clean_tokens))
    current = valid.clone() if start is None else start.detach().cpu().clone()
    if current.shape != valid.shape or current.dtype != torch.bool:
        raise ValueError(f"start must be a boolean circuit of shape {tuple(valid.shape)}, got {tuple(current.shape)}")
    cache = ablation_caches(model, [ablation], clean_tokens, corrupted_tokens, seed)[0]  # once, not per pass
    reader_of, writer_of, _, _ = _node_maps(layout, int(cfg.n_heads), torch.device("cpu"))

    def run(circuits: Tensor) -> Tensor:
        return evaluate(
            model, clean_tokens, corrupted_tokens, metric, circuits.to(clean_tokens.device), ablation=cache,
            chunk_size=chunk_size, memory_budget=memory_budget,
        ).cpu()

    result = AcdcResult(circuit=current, metric=float(run(current[None])[0]), passes=1, candidates=1)
    for r in reversed(range(len(layout.readers))):
        nodes = torch.nonzero(reader_of[r]).flatten()
        has_output = (current.any(1).float() @ writer_of) > 0  # [nodes]: an edge leaves the node's writer
        if len(nodes) and not has_output[nodes].any():
            # the reader's node(s) have no outgoing edge: nothing into it reaches the output
            for w in reversed(torch.nonzero(current[:, r]).flatten().tolist()):
                result.log.append((w, r, 0.0, True))
            current[:, r] = False
            continue
        candidates = list(reversed(torch.nonzero(current[:, r]).flatten().tolist()))
        while candidates:
            stack = current[None].repeat(len(candidates), 1, 1)
            for i in range(len(candidates)):  # circuit i: without the first i + 1 candidates
                stack[i:, candidates[i], r] = False
            values = run(stack)
            result.passes += 1
            result.candidates += len(candidates)
            kept_at = None
            for i, w in enumerate(candidates):
                change = float(values[i]) - result.metric
                result.visited += 1
                if change < threshold:
                    current[w, r] = False
                    result.metric = float(values[i])
                    result.log.append((w, r, change, True))
                else:
                    result.log.append((w, r, change, False))
                    kept_at = i
                    break
            candidates = [] if kept_at is None else candidates[kept_at + 1 :]
    result.circuit = current
    return result
