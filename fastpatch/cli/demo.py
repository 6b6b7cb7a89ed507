"""``fastpatch demo``: find the shipped induction model's circuit from scratch, offline.

The embedded model (:func:`fastpatch.models.load_induction_model`) continues repeated random token
sequences. Clean prompts are ``BOS, r_1..r_n, r_1..r_n``; corrupted prompts replace the first
repeat with other tokens, so the last position (``r_n``) can no longer be continued by copying.
The metric is the logit difference ``r_1 - c_1`` at the last position. The demo then:

1. runs exact sweeps (head outputs; every head component; the residual stream by position) and
   direct path patching from every head into every later head's queries, keys and values, and,
   unless ``compare=False``, the same TransformerLens calls, checking the values agree and timing both;
2. picks the important heads (normalised effect at least ``threshold``) and classifies each from
   its attention pattern on the clean prompts: previous-token heads (attention from ``i`` to
   ``i - 1``) and induction heads (attention from the second ``r_k`` to the first ``r_{k+1}``);
3. reads the direct paths from layer-0 heads into layer-1 heads: an induction circuit is
   K-composition, previous-token head -> induction head keys;
4. estimates the head effects with attribution patching and every edge with edge attribution, and
   measures every edge exactly (``fastpatch.circuits.exact_edges``: each edge patched alone, batched)
   to show the estimates beside the ground truth;
5. evaluates the top-n circuits of the exact edge scores at MIB's sizes, everything else ablated
   and finer ones (corrupted and zero ablation, with random circuits as a baseline): the faithfulness curve, CPR/CMD
   and the graph of the smallest circuit keeping 80% of the behaviour (``fastpatch.circuits``); and
   zero-ablates each head of the clean run (a ``fastpatch.sources.zero_ablation`` cache as the source
   of the head sweep);
6. compares what it found with the circuit the training script recorded and writes an HTML report.

The circuit counts as recovered when every important head is a previous-token or induction head
of the recorded circuit, both kinds are present, and the strongest direct path is a key path from
a previous-token head into an induction head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

import pandas as pd
import torch
from torch import Tensor

PATCH_TYPES = ("output", "query", "key", "value", "pattern")
KEEP = 0.8  # the circuit graph shows the smallest top-n circuit keeping this much of the behaviour
# MIB's sizes, and finer ones where the 110-edge model's curve rises (MIB's jump from 20% to 50% of edges)
CURVE_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 1.0)


@dataclass
class DemoResult:
    """What the demo found, measured and wrote."""

    clean_value: float
    corrupted_value: float
    important_heads: pd.DataFrame  # layer, head, effect, normalised, role
    previous_token_heads: List[Tuple[int, int]]
    induction_heads: List[Tuple[int, int]]
    strongest_path: Dict[str, Any]  # source, destination, component, effect
    recorded_circuit: Dict[str, List[Tuple[int, int]]]
    recovered: bool
    timings: pd.DataFrame  # call, cells, fastpatch_s, transformer_lens_s, speedup, max_abs_diff
    report: Path
    values: Dict[str, Tensor] = field(default_factory=dict)
    curve: Any = None  # fastpatch.circuits.FaithfulnessCurve of the exact edge scores' top-n circuits
    shown_circuit: int = -1  # index into curve.counts of the circuit drawn as a graph


def _timed(fn: Callable[[], Any], repeats: int = 2) -> Tuple[Any, float]:
    """``fn()``'s result and its best wall time over ``repeats`` runs (the first run of a sweep
    pays one-time costs, imports and allocator warm-up, that a long session does not)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def attention_scores(pattern0: Tensor, pattern1: Tensor, half_len: int) -> Tuple[Tensor, Tensor]:
    """Previous-token scores of layer-0 heads and induction scores of layer-1 heads, ``[n_heads]``
    each, from ``[batch, head, query, key]`` patterns on ``BOS + seq + seq`` prompts."""
    q = torch.arange(1, pattern0.shape[-1])
    previous = pattern0[:, :, q, q - 1].mean((0, 2))
    q2 = torch.arange(half_len + 1, 2 * half_len + 1)  # second-repeat positions of r_1..r_n
    induction = pattern1[:, :, q2, q2 - half_len + 1].mean((0, 2))
    return previous, induction


def report_path(out: Union[str, Path]) -> Path:
    """Where the report goes: ``out`` if it already names an ``.html`` file, else ``<out>.html``."""
    out = Path(out)
    return out if out.suffix.lower() == ".html" else Path(f"{out}.html")


def run_demo(
    out: Path = Path("fastpatch-demo"),
    n_prompts: int = 64,
    half_len: int = 16,
    seed: int = 7,
    threshold: float = 0.3,
    compare: bool = True,
    progress: bool = True,
    repeats: int = 2,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring) and write ``<out>.html`` (``out`` itself if it ends in ``.html``). Sweeps are timed as the
    best of ``repeats`` runs, fastpatch and TransformerLens alike."""
    from fastpatch import analysis, figures
    from fastpatch import patching as fp
    from fastpatch.attribution import get_attr_patch_attn_head_out_all_pos, get_attr_patch_edges
    from fastpatch.circuits import exact_edges, faithfulness_curve
    from fastpatch.circuits.plots import circuit_graph_figure, faithfulness_figure
    from fastpatch.cli.main import curve_table, shown_circuit
    from fastpatch.metrics import LogitDiff
    from fastpatch.models import induction_model_info, induction_prompts, load_induction_model
    from fastpatch.sources import zero_ablation

    model = load_induction_model()
    if model.cfg.n_layers != 2:
        raise ValueError("the demo's circuit analysis expects the shipped 2-layer model")
    clean, corrupted, answer, wrong = induction_prompts(n_prompts, half_len, seed)
    metric = LogitDiff(answer, wrong)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
        clean_value, corrupted_value = float(metric(model(clean))), float(metric(model(corrupted)))
    echo(f"induction model: {n_prompts} prompts of {clean.shape[1]} tokens; logit difference "
         f"clean {clean_value:.2f}, corrupted {corrupted_value:.2f}")

    # 1. exact sweeps and direct paths, with TransformerLens's same calls beside them
    sweep_args = (model, corrupted, clean_cache, metric)
    path_args = (model, corrupted, clean_cache, corrupted_cache, metric)
    bar = {"progress": progress}  # fastpatch's sweeps take it; TransformerLens's show their own bars
    calls = [  # (key, function name, positional arguments, keyword arguments, fastpatch-only keyword arguments)
        ("heads", "get_act_patch_attn_head_out_all_pos", sweep_args, {}, bar),
        ("every", "get_act_patch_attn_head_all_pos_every", sweep_args, {}, bar),
        ("resid", "get_act_patch_resid_pre", sweep_args, {}, bar),
    ] + [(f"paths_{c}", "get_act_patch_direct_path_all_sources", path_args, {"component": c, "verbose": False}, {})
         for c in "qkv"]
    values: Dict[str, Tensor] = {}
    rows = []
    for key, name, call_args, kwargs, own in calls:
        ours, seconds = _timed(lambda: getattr(fp, name)(*call_args, **kwargs, **own), repeats)
        values[key] = ours
        label = name + (f"({kwargs['component']})" if "component" in kwargs else "")
        row = {"call": label, "cells": ours.numel(), "fastpatch_s": seconds}
        if compare:
            import transformer_lens.patching as tl

            theirs, tl_seconds = _timed(lambda: getattr(tl, name)(*call_args, **kwargs), repeats)
            row.update(transformer_lens_s=tl_seconds, speedup=tl_seconds / seconds,
                       max_abs_diff=float((ours - theirs).abs().max()))
        rows.append(row)
    timings = pd.DataFrame(rows)
    echo(timings.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if compare and not bool((timings["max_abs_diff"] <= 1e-4 * max(1.0, abs(clean_value))).all()):
        raise RuntimeError(f"fastpatch and TransformerLens disagree:\n{timings}")

    # 2. important heads and their roles
    effect = values["heads"] - corrupted_value
    normalised = analysis.normalized_effect(values["heads"], clean_value, corrupted_value)
    previous_score, induction_score = attention_scores(
        clean_cache["blocks.0.attn.hook_pattern"], clean_cache["blocks.1.attn.hook_pattern"], half_len)
    important = analysis.find_important_heads(normalised, threshold)
    roles, effects = [], []
    for layer, head in zip(important["layer"], important["head"]):
        score = (previous_score if layer == 0 else induction_score)[head]
        kind = "previous-token" if layer == 0 else "induction"
        roles.append(f"{kind} ({float(score):.2f})" if score > 0.5 else "other")
        effects.append(float(effect[layer, head]))
    important = important.rename(columns={"value": "normalised"}).assign(effect=effects, role=roles)
    previous_heads = [(int(l), int(h)) for l, h, r in zip(important["layer"], important["head"], roles) if r.startswith("previous")]
    induction_heads = [(int(l), int(h)) for l, h, r in zip(important["layer"], important["head"], roles) if r.startswith("induction")]

    # 3. direct paths layer 0 -> layer 1 queries, keys and values
    paths = {c: values.pop(f"paths_{c}")[0, :, 1, :] - corrupted_value for c in "qkv"}  # [layer-0 source, layer-1 destination]
    stacked = torch.stack([paths[c] for c in ("q", "k", "v")])
    component, source, destination = torch.unravel_index(stacked.argmax(), stacked.shape)
    strongest = {"source": (0, int(source)), "destination": (1, int(destination)),
                 "component": "qkv"[int(component)], "effect": float(stacked.max())}
    values.update({f"direct_path_{c}": v for c, v in paths.items()})

    # 4. attribution: head outputs and every edge; every edge exactly, beside its estimate
    estimate = get_attr_patch_attn_head_out_all_pos(model, clean, corrupted, metric)
    edges = get_attr_patch_edges(model, clean, corrupted, metric)
    exact, exact_seconds = _timed(lambda: exact_edges(model, clean, corrupted, metric, progress=progress), 1)
    values.update(attribution_heads=estimate, attribution_edges=edges.scores, exact_edges=exact.scores)
    edge_table = exact.top_edges(10).rename(columns={"score": "exact"})
    index = {(w, r): (i, j) for i, w in enumerate(exact.writer_names) for j, r in enumerate(exact.reader_names)}
    edge_table["attribution"] = [float(edges.scores[index[(w, r)]]) for w, r in zip(edge_table.writer, edge_table.reader)]
    valid = exact.valid
    frame = exact.to_frame()  # the valid edges in the order of scores[valid]
    edge_names = [f"{w}->{r}" for w, r in zip(frame.writer, frame.reader)]
    echo(f"exact edges: {int(valid.sum())} edges in {exact_seconds:.2f} s; strongest "
         f"{edge_table.writer[0]} -> {edge_table.reader[0]} {edge_table.exact[0]:+.3f} "
         f"(attribution {edge_table.attribution[0]:+.3f})")

    # 5. circuits: faithfulness of the exact scores' top-n circuits; each head zero-ablated (an issue-15 source)
    curve = faithfulness_curve(model, clean, corrupted, metric, exact, sizes=CURVE_SIZES, ablation=["corrupted", "zero"],
                               n_random=1, seed=seed)
    shown = shown_circuit(curve, KEEP)
    n_shown = int(curve.n_edges[shown])
    zero_heads = fp.get_act_patch_attn_head_out_all_pos(model, clean, zero_ablation(model, clean), metric, progress=progress)
    values.update(zero_ablated_heads=zero_heads)
    drop_layer, drop_head = divmod(int((zero_heads - clean_value).argmin()), zero_heads.shape[1])
    circuit_lines = [
        f"faithfulness of the top-n exact edges: {n_shown} of {curve.n_items} edges ({n_shown / curve.n_items:.1%}) keep "
        + ", ".join(f"{float(curve.faithfulness[a, shown]):.2f} ({name} ablation)" for a, name in enumerate(curve.ablations))
        + "; " + ", ".join(f"{name} CPR {float(curve.cpr[a]):.3f} CMD {float(curve.cmd[a]):.3f}"
                           for a, name in enumerate(curve.ablations)),
        f"zero-ablating one head of the clean run: largest drop L{drop_layer}H{drop_head}, logit difference "
        f"{clean_value:.2f} -> {float(zero_heads[drop_layer, drop_head]):.2f}",
    ]

    # 6. compare with the recorded circuit
    circuit = induction_model_info()["circuit"]
    recorded = {k: [tuple(x) for x in circuit[k]] for k in ("previous_token_heads", "induction_heads")}
    recovered = (
        bool(previous_heads) and bool(induction_heads) and "other" not in roles
        and set(previous_heads) <= set(recorded["previous_token_heads"])
        and set(induction_heads) <= set(recorded["induction_heads"])
        and strongest["component"] == "k" and strongest["source"] in previous_heads
        and strongest["destination"] in induction_heads
    )
    name = lambda lh: f"L{lh[0]}H{lh[1]}"  # noqa: E731
    summary = [
        f"important heads (normalised effect >= {threshold}):",
        important.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        f"previous-token heads: {', '.join(map(name, previous_heads)) or 'none'}; "
        f"induction heads: {', '.join(map(name, induction_heads)) or 'none'}",
        f"strongest direct path: {name(strongest['source'])} -> {name(strongest['destination'])} "
        f"{strongest['component'].upper()} input, effect {strongest['effect']:+.3f} "
        f"(Q {float(paths['q'][source, destination]):+.3f}, V {float(paths['v'][source, destination]):+.3f})",
        f"recorded circuit: previous-token {', '.join(map(name, recorded['previous_token_heads']))}; "
        f"induction {', '.join(map(name, recorded['induction_heads']))}",
        f"circuit recovered: {'yes' if recovered else 'NO'}",
        *circuit_lines,
    ]
    echo("\n".join(summary))

    tokens = [str(t) for t in corrupted[0].tolist()]
    labels = [f"L{l}H{h}" for l in range(2) for h in range(model.cfg.n_heads)]
    every = analysis.normalized_effect(values["every"], clean_value, corrupted_value)
    sections = [
        ("Summary", "\n".join(summary)),
        ("Head outputs: normalised effect (patched - corrupted) / (clean - corrupted)",
         figures.layer_head_heatmap(normalised, title="Head output")),
    ]
    sections += [(f"Head {p}: normalised effect", figures.layer_head_heatmap(every[i], title=f"Head {p}"))
                 for i, p in enumerate(PATCH_TYPES) if p != "output"]  # the output grid is shown above
    sections += [
        ("Residual stream by position: normalised effect (prompt 0's corrupted tokens)",
         figures.layer_position_heatmap(analysis.normalized_effect(values["resid"], clean_value, corrupted_value), tokens)),
        ("Direct paths layer 0 -> layer 1 keys (effect on the logit difference)",
         figures.heatmap(paths["k"], x_label="destination head (layer 1)", y_label="source head (layer 0)", title="K-composition")),
        ("Direct paths layer 0 -> layer 1 queries", figures.heatmap(paths["q"], x_label="destination head (layer 1)",
                                                                     y_label="source head (layer 0)", title="Q-composition")),
        ("Attribution vs exact patching (head outputs)", figures.attribution_scatter(effect, estimate, labels)),
        ("Top edges, exact (each edge patched alone) beside edge attribution", edge_table),
        ("Edge attribution vs exact edges (every edge)",
         figures.attribution_scatter(exact.scores[valid], edges.scores[valid], edge_names,
                                     title="Edge attribution vs exact edge patching")),
        ("Faithfulness of the top-n exact edges (everything else ablated; random circuits dashed)",
         faithfulness_figure(curve)),
        ("Normalised faithfulness by size", curve_table(curve)),
        (f"Circuit graph: the {n_shown} exact edges keeping {KEEP:.0%} of the behaviour (corrupted ablation)",
         circuit_graph_figure(model, curve.circuits[shown], exact.scores, title=f"Induction circuit, {n_shown} edges")),
        ("Each head zero-ablated on the clean prompts (logit difference)",
         figures.layer_head_heatmap(zero_heads, title="Zero ablation")),
        ("Speed against TransformerLens" if compare else "Timings", timings),
    ]
    report = figures.write_report(report_path(out), sections, title="fastpatch demo: the induction circuit")
    echo(f"wrote {report}")
    return DemoResult(clean_value, corrupted_value, important, previous_heads, induction_heads, strongest, recorded,
                      recovered, timings, report, values, curve, shown)
