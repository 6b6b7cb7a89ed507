"""How well do attribution estimates rank the cells of exact activation patching? (trained induction model)

On fastpatch's shipped 2-layer induction model (``fastpatch.models.load_induction_model()``:
previous-token head L0H3 K-composed into the induction heads of layer 1) and the prompts
``induction_prompts(32, 16, seed=7)`` (clean ``BOS, r, r``; corrupted ``BOS, c, r``), with the
metric "mean over prompts of the last-position logit difference answer - wrong", this script
computes, for head outputs, queries, keys, values and attention patterns, all positions
(``[layer, head]``) and by position (``[layer, pos, head]``; the pattern by destination row,
``[layer, head, dest_pos]``):

- ``exact``: ``fastpatch.patching.get_act_patch_<sweep>`` minus the corrupted baseline (each
  cell's clean activation patched into the corrupted run), the ground truth;
- ``attribution``: ``fastpatch.attribution.get_attr_patch_<sweep>`` (first order at the
  corrupted run);
- ``atp*``: ``get_attr_patch_attn_head_{q,k}_{all,by}_pos_atpstar`` (pattern recomputed exactly,
  only pattern -> metric linearised), for queries and keys;
- ``ig``: ``get_attr_patch_ig(..., sweep, ig_steps)`` (every site of the sweep interpolated at
  once, midpoint rule).

For each estimate it reports the Spearman rank correlation with the exact grid over all cells
and over the *active* cells (those where the exact effect or the estimate is not zero: patching
the other cells provably changes nothing at the metric, e.g. layer-0 queries of the second half,
whose tokens the two prompts share, or layer-1 cells away from the last position, which the
metric does not read; every method gets those right, so they inflate the all-cells figure), the
Spearman over the *major* cells (``|exact| >= 1%`` of the grid's largest: the ranking among the
cells that matter, without the long tail of tiny effects that dominates a 264-cell grid), the
Pearson correlation, and whether the top-3 cells by ``|value|`` are the exact top-3. Values with
``|x| <= 1e-6 x max(|clean metric|, |corrupted metric|)`` are taken as 0, in every grid: fp32 exact
patching cannot resolve smaller effects (it leaves up to ~7e-7 of float noise where the true effect
is 0, on a metric of ~12), and an estimate that small says "no effect" too. Spearman: Pearson correlation of average ranks (ties share their mean
rank), computed with torch.

    python bench/attribution_quality.py          # -> bench/results/cpu-attribution-rank-correlation-induction.json
    python bench/attribution_quality.py --grids  # also store every grid in the JSON

``--faithfulness`` writes instead the faithfulness table in the form the literature uses (RelP,
Jafari et al. 2025: Pearson and Spearman correlation with exact patching, per component type) on
BOTH shipped models: the induction model above and the greater-than model
(``load_greater_than_model()``, ``greater_than_prompts(64, seed=7)``, Hanna et al.'s probability
difference). Component types: the residual stream by position (``resid_pre`` ``[layer, pos]``),
attention heads (head outputs, ``[layer, head]``), head queries and keys (``[layer, head]``, where
AtP*'s QK fix applies), MLPs (``mlp_out`` ``[layer, pos]``) and edges (writer -> reader, summed over
positions). Methods: attribution patching (AtP), AtP* (its QK fix, for queries and keys: the
library's ``*_atpstar``), integrated gradients (node IG ``get_attr_patch_ig``; for edges EAP-IG,
``get_attr_patch_edges(..., ig_steps)``) and GradDrop (nodes inside a layer's contribution). A
method that does not apply to a component type is left out of its row, with the reason in the
JSON. Exact node values: ``fastpatch.patching`` sweeps minus the baseline; exact edge values:
``EXACT_EDGES`` (``fastpatch.circuits.exact_edges``, checked against :func:`plain_loop_edges`, one
hooked forward per edge, and against direct path patching), plus top-k recall of the edges
(k = 1%, 5%, 10% of the valid edges)::

    python bench/attribution_quality.py --faithfulness           # -> bench/results/cpu-faithfulness.json
    python bench/attribution_quality.py --faithfulness --readme  # also the README's faithfulness table
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TQDM_DISABLE", "1")

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bench import compare_transformer_lens as cli
from bench.models import logit_diff_metric
from fastpatch.circuits import exact_edges

SWEEPS: Tuple[str, ...] = (
    "attn_head_out_all_pos",
    "attn_head_q_all_pos",
    "attn_head_k_all_pos",
    "attn_head_v_all_pos",
    "attn_head_pattern_all_pos",
    "attn_head_out_by_pos",
    "attn_head_q_by_pos",
    "attn_head_k_by_pos",
    "attn_head_v_by_pos",
    "attn_head_pattern_by_pos",
)
ATPSTAR = {
    "attn_head_q_all_pos": "get_attr_patch_attn_head_q_all_pos_atpstar",
    "attn_head_k_all_pos": "get_attr_patch_attn_head_k_all_pos_atpstar",
    "attn_head_q_by_pos": "get_attr_patch_attn_head_q_by_pos_atpstar",
    "attn_head_k_by_pos": "get_attr_patch_attn_head_k_by_pos_atpstar",
}
METHODS = ("attribution", "atp*", "ig")
NOISE = 1e-6  # |value| <= NOISE * max(|clean metric|, |corrupted metric|) counts as 0 (fp32 patching noise)
MAJOR = 0.01  # "major" cells: |exact| >= MAJOR * max |exact|
TOP_K = 3


# ----------------------------------------------------------------------------- statistics


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (``scipy.stats.rankdata``)."""
    x = x.reshape(-1).double()
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equal-size tensors (NaN when either is constant or has < 2 values)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    return pearson(rankdata(a), rankdata(b))


def denoise(x: torch.Tensor, floor: float) -> torch.Tensor:
    """``x`` with entries of ``|x| <= floor`` set to exactly 0 (float64, CPU)."""
    x = x.detach().double().cpu()
    return torch.where(x.abs() <= floor, torch.zeros_like(x), x)


def top_cells(x: torch.Tensor, k: int) -> List[Tuple[int, ...]]:
    """The ``k`` cells of largest ``|x|`` (ties by flat index), as index tuples."""
    order = torch.argsort(x.reshape(-1).abs(), descending=True, stable=True)[:k]
    return [tuple(int(i) for i in idx) for idx in zip(*torch.unravel_index(order, tuple(x.shape)))]


def agreement(estimate: torch.Tensor, exact: torch.Tensor, floor: float = 0.0, k: int = TOP_K) -> Dict[str, Any]:
    """Rank / linear correlation with the exact grid over all, active and major cells, and top-k overlap.

    Values with ``|x| <= floor`` count as 0 in both grids.
    """
    est, ex = denoise(estimate, floor), denoise(exact, floor)
    if est.shape != ex.shape:
        raise ValueError(f"estimate {tuple(est.shape)} and exact {tuple(ex.shape)} grids differ")
    active = (est != 0) | (ex != 0)
    major = ex.abs() >= MAJOR * float(ex.abs().max())
    top_est, top_ex = top_cells(est, k), top_cells(ex, k)
    at_exact_top = [float(est[c]) for c in top_ex]
    return {
        "spearman": spearman(est, ex),
        "spearman_active": spearman(est[active], ex[active]),
        "spearman_major": spearman(est[major], ex[major]),
        "pearson": pearson(est, ex),
        "cells": int(ex.numel()),
        "active_cells": int(active.sum()),
        "major_cells": int(major.sum()),
        f"top{k}": [list(c) for c in top_est],
        f"top{k}_overlap": len(set(top_est) & set(top_ex)),
        f"top{k}_equal": set(top_est) == set(top_ex),
        f"top{k}_same_order": top_est == top_ex,
        f"at_exact_top{k}": at_exact_top,
        "sign_agreement_active": float(((est[active] > 0) == (ex[active] > 0)).double().mean()) if active.any() else float("nan"),
    }


# ----------------------------------------------------------------------------- run


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser(
        "Rank correlation (Spearman) and top-3 agreement between attribution estimates (plain, AtP*, "
        "integrated gradients) and exact activation patching on fastpatch's trained induction model; "
        "prints a table and writes a JSON result under bench/results/."
    )
    p.add_argument("--prompts", type=int, default=32, help="number of induction prompt pairs")
    p.add_argument("--half-len", type=int, default=16, help="length of the repeated sequence (prompt = 1 + 2 * half_len)")
    p.add_argument("--seed", type=int, default=7, help="seed of induction_prompts")
    p.add_argument("--ig-steps", type=int, default=8, help="integrated-gradients steps (midpoint rule)")
    p.add_argument("--sweeps", nargs="+", default=list(SWEEPS), metavar="SWEEP",
                   help=f"sweeps to compare; choices: {', '.join(SWEEPS)}")
    p.add_argument("--grids", action="store_true",
                   help="store every exact and estimated grid in the JSON (with --faithfulness: the per-position edges' too)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result path (default: bench/results/cpu-attribution-rank-correlation-induction.json, "
                        "with --faithfulness bench/results/cpu-faithfulness.json)")
    p.add_argument("--faithfulness", action="store_true",
                   help="write the faithfulness table (Pearson / Spearman per component type, edge top-k recall) "
                        "on both shipped models instead")
    p.add_argument("--models", nargs="+", default=["induction", "greater_than"], choices=["induction", "greater_than"],
                   help="with --faithfulness: the shipped models")
    p.add_argument("--readme", action="store_true", help="with --faithfulness: update the README's table")
    return p


def _timed(fn: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace, command: Optional[str] = None) -> Dict[str, Any]:
    """Exact sweeps and every estimate on the induction model; the result record."""
    from fastpatch import attribution as fa
    from fastpatch import patching as fp
    from fastpatch.models import induction_model_info, induction_prompts, load_induction_model

    unknown = [s for s in args.sweeps if s not in SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {list(SWEEPS)}")
    model = load_induction_model()
    clean, corrupted, answer, wrong = induction_prompts(args.prompts, args.half_len, seed=args.seed)
    metric = logit_diff_metric(answer, wrong)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        clean_metric = float(metric(model(clean)))
        corrupted_metric = float(metric(model(corrupted)))

    floor = NOISE * max(abs(clean_metric), abs(corrupted_metric))
    rows = []
    for sweep in args.sweeps:
        exact_fn = getattr(fp, f"get_act_patch_{sweep}")
        with torch.no_grad():
            result, t_exact = _timed(lambda: exact_fn(model, corrupted, clean_cache, metric, baseline=True, progress=False))
        exact = (result.values - result.baseline).detach().double().cpu()
        axes = list(exact_fn.keywords["index_axis_names"])
        estimates: Dict[str, Tuple[torch.Tensor, float]] = {
            "attribution": _timed(lambda: getattr(fa, f"get_attr_patch_{sweep}")(model, clean, corrupted, metric)),
        }
        if sweep in ATPSTAR:
            estimates["atp*"] = _timed(lambda: getattr(fa, ATPSTAR[sweep])(model, clean, corrupted, metric))
        estimates["ig"] = _timed(lambda: fa.get_attr_patch_ig(model, clean, corrupted, metric, sweep, ig_steps=args.ig_steps))
        row: Dict[str, Any] = {
            "sweep": sweep,
            "axes": axes,
            "shape": list(exact.shape),
            "exact_seconds": t_exact,
            "exact_top3": [list(c) for c in top_cells(denoise(exact, floor), TOP_K)],
            "exact_top3_values": [float(exact[c]) for c in top_cells(denoise(exact, floor), TOP_K)],
            "exact_max_abs": float(exact.abs().max()),
            "methods": {},
        }
        if args.grids or exact.numel() <= 16:
            row["exact"] = exact.tolist()
        for method, (estimate, seconds) in estimates.items():
            entry = {"function": _function_name(method, sweep, args.ig_steps), "seconds": seconds,
                     **agreement(estimate, exact, floor)}
            if args.grids or exact.numel() <= 16:
                entry["estimate"] = estimate.detach().double().cpu().tolist()
            row["methods"][method] = entry
        rows.append(row)
        print(f"  {sweep}: done", flush=True)

    info = induction_model_info()
    return {
        "benchmark": "attribution_quality",
        "command": command,
        **cli.machine_record("cpu", torch.device("cpu")),
        "config": {
            "model": {"loader": "fastpatch.models.load_induction_model()", "architecture": info.get("architecture"),
                      "n_layers": int(model.cfg.n_layers), "d_model": int(model.cfg.d_model),
                      "n_heads": int(model.cfg.n_heads), "d_vocab": int(model.cfg.d_vocab),
                      "circuit": {k: info["circuit"][k] for k in ("previous_token_heads", "induction_heads")}},
            "prompts": f"induction_prompts({args.prompts}, {args.half_len}, seed={args.seed})",
            "batch": args.prompts,
            "positions": int(clean.shape[1]),
            "metric": "mean over prompts of last-position logit[answer] - logit[wrong] (bench.models.logit_diff_metric)",
            "exact": "fastpatch.patching.get_act_patch_<sweep>(..., baseline=True): values - baseline",
            "ig_steps": args.ig_steps,
            "ig_rule": "midpoint, every site of the sweep interpolated at once",
            "noise_floor": floor,
            "noise": f"values with |x| <= noise_floor = {NOISE:g} * max(|clean metric|, |corrupted metric|) count as 0",
            "active_cells": "cells where the exact effect or the estimate is nonzero (after the noise floor)",
            "major_cells": f"cells with |exact| >= {MAJOR:g} * max |exact| of their grid",
            "spearman": "Pearson correlation of average ranks (ties share their mean rank), torch",
            "top_k": f"top-{TOP_K} cells by |value|",
        },
        "clean_metric": clean_metric,
        "corrupted_metric": corrupted_metric,
        "summary": {
            "spearman_active": {r["sweep"]: {m: v["spearman_active"] for m, v in r["methods"].items()} for r in rows},
            f"top{TOP_K}_overlap": {r["sweep"]: {m: v[f"top{TOP_K}_overlap"] for m, v in r["methods"].items()} for r in rows},
        },
        "results": rows,
    }


# ----------------------------------------------------------------------------- faithfulness table (RelP's form)

QKV = ("q", "k", "v")
TOP_K_FRACTIONS = (0.01, 0.05, 0.10)  # top-k recall of the edges, k as a fraction of the valid edges
# component type -> the sweep of fastpatch.patching that is its exact value (nodes)
NODE_COMPONENTS: Dict[str, str] = {
    "resid (by position)": "resid_pre",
    "attention heads": "attn_head_out_all_pos",
    "head queries": "attn_head_q_all_pos",
    "head keys": "attn_head_k_all_pos",
    "MLPs (by position)": "mlp_out",
}
FAITHFULNESS_METHODS = ("attribution", "atp*", "ig", "graddrop")
METHOD_LABELS = {"attribution": "AtP", "atp*": "AtP* (QK fix)", "ig": "IG / EAP-IG", "graddrop": "GradDrop"}


def plain_loop_edges(
    model: Any, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
    patching_metric: Callable[[Tensor], Tensor], *, per_position: bool = False,
    cells: Optional[Sequence[Tuple[int, ...]]] = None,
) -> Any:
    """The exact effect of every edge, by a plain loop: one hooked forward of the corrupted prompts per edge.

    For the edge ``writer -> reader`` the reader's input receives the writer's clean output in place
    of its corrupted one (``+ write_clean - write_corrupted``, at every position), everything else
    stays corrupted. Writers: the token embedding (``hook_embed``; positions are the same in both
    runs), each head's ``z[:, :, h] @ W_O[h]``, each MLP's output. Readers, through TransformerLens's
    own hook points: head ``h``'s Q/K/V input (``attn.hook_{q,k,v}_input`` with ``use_split_qkv_input``:
    the pre-norm residual copy only that head's projection reads), the MLP input (``ln2.hook_in``,
    the MLP's copy) and the logits (``ln_final.hook_in``). A reader reads a writer of an earlier
    layer, and a head of its own layer for the MLP (sequential blocks). Result: an
    ``fastpatch.attribution.EdgeScores`` (scores = patched metric - corrupted metric, 0 off the
    edges) in the layout of ``get_attr_patch_edges``. Sequential blocks with one K/V per head only.

    ``per_position``: one edge per position ``p``, only the write at ``p`` added to the reader's
    input at ``p`` (scores ``[n_writers, n_readers, pos]``). ``cells``: run only these
    ``(writer, reader)`` (``(writer, reader, pos)`` per position) index tuples, 0 elsewhere: a sample
    to check a batched result against, where the full loop would take too long.
    """
    from fastpatch._tl_private import split_qkv_input
    from fastpatch.attribution import EdgeScores
    from fastpatch.engine.model_state import preserved_model_state

    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    if getattr(cfg, "n_key_value_heads", None) not in (None, n_heads) or getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("plain_loop_edges: sequential blocks with one K/V head per query head only")
    z_hooks = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    mlp_hooks = [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    names = ["hook_embed", *z_hooks, *mlp_hooks]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        corrupted_logits, corrupted = model.run_with_cache(corrupted_tokens, names_filter=lambda n: n in names)
        baseline = float(patching_metric(corrupted_logits))

        def delta(hook: str) -> Tensor:
            return clean[hook] - corrupted[hook]

        writer_names, writer_layers, writes = ["embed"], [-1], [delta("hook_embed")]
        for l in range(n_layers):
            dz, W_O = delta(z_hooks[l]), model.blocks[l].attn.W_O.detach()  # [b, p, H, d_head], [H, d_head, d_model]
            writer_names += [f"L{l}H{h}" for h in range(n_heads)] + [f"MLP{l}"]
            writer_layers += [l] * (n_heads + 1)
            writes += [dz[:, :, h] @ W_O[h] for h in range(n_heads)] + [delta(mlp_hooks[l])]
    writer_is_mlp = [name.startswith("MLP") for name in writer_names]
    readers: List[Tuple[str, int, str, Optional[int]]] = []  # name, layer, hook point, head slice
    for l in range(n_layers):
        readers += [(f"L{l}H{h}.{c}", l, f"blocks.{l}.attn.hook_{c}_input", h) for c in QKV for h in range(n_heads)]
        readers.append((f"MLP{l}.in", l, f"blocks.{l}.ln2.hook_in", None))
    readers.append(("logits", n_layers, "ln_final.hook_in", None))
    valid = torch.tensor([
        [r_layer > w_layer or (r_layer == w_layer and head is None and r_name != "logits" and not w_mlp and w_layer >= 0)
         for r_name, r_layer, _, head in readers]
        for w_layer, w_mlp in zip(writer_layers, writer_is_mlp)
    ])
    n_pos = int(corrupted_tokens.shape[1])
    scores = torch.zeros(valid.shape + ((n_pos,) if per_position else ()), dtype=torch.float64)
    if cells is None:
        cells = [(w, r, *([p] if per_position else [])) for w, r in torch.nonzero(valid).tolist()
                 for p in (range(n_pos) if per_position else [None])]
    with preserved_model_state(model), split_qkv_input(model), torch.no_grad():
        for cell in cells:
            w, r = cell[:2]
            if not valid[w, r]:
                raise ValueError(f"cell {cell}: {writer_names[w]} -> {readers[r][0]} is not an edge")
            write, (_, _, hook_point, head) = writes[w], readers[r]
            if per_position:  # the write at this position only
                write = torch.where(torch.arange(n_pos)[None, :, None] == cell[2], write, torch.zeros_like(write))

            def patch(activation: Tensor, hook: Any, write: Tensor = write, head: Optional[int] = head) -> Tensor:
                if head is None:
                    return activation + write
                activation = activation.clone()
                activation[:, :, head] = activation[:, :, head] + write
                return activation

            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(hook_point, patch)])
            scores[tuple(cell)] = float(patching_metric(logits)) - baseline
    return EdgeScores(scores=scores, valid=valid, writer_names=writer_names, reader_names=[r[0] for r in readers])


# The exact edge values the table is measured against: the batched fastpatch.circuits.exact_edges
# (denoising, summed over positions), checked edge by edge against plain_loop_edges on every run.
# Setting EXACT_EDGES = plain_loop_edges measures against the plain loop alone.
EXACT_EDGES: Callable[..., Any] = exact_edges
EXACT_EDGES_NAME = "fastpatch.circuits.exact_edges (batched; every edge checked against plain_loop_edges)"


def _agreement_check(ours: Sequence[float], theirs: Sequence[float], what: str) -> Dict[str, Any]:
    """Max error of ``ours`` against ``theirs`` (float64); ``AssertionError`` above 1e-5 of the largest
    ``|theirs|`` (fp32), or when ``theirs`` is all zero (nothing would have been compared)."""
    ours_t, theirs_t = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    error, scale = float((ours_t - theirs_t).abs().max()), float(theirs_t.abs().max())
    assert scale > 0 and error <= 1e-5 * scale, f"exact edges disagree with {what}: {error:.3g} (scale {scale:.3g})"
    return {"edges_checked": len(ours), "max_abs_error": error, "max_abs_value": scale}


def check_against_plain_loop(edges: Any, loop: Any, cells: Optional[Sequence[Tuple[int, ...]]] = None) -> Dict[str, Any]:
    """Every valid edge of ``edges`` (or only ``cells``, the index tuples the loop ran) against
    :func:`plain_loop_edges`' (same names, validity and shape)."""
    if edges.writer_names != loop.writer_names or edges.reader_names != loop.reader_names or \
            not torch.equal(edges.valid.cpu(), loop.valid.cpu()) or edges.scores.shape != loop.scores.shape:
        raise AssertionError("the exact edges' layout differs from the plain loop's")
    ours, theirs = edges.scores.double().cpu(), loop.scores.double().cpu()
    if cells is None:
        valid = loop.valid.cpu()
        return _agreement_check(ours[valid].tolist(), theirs[valid].tolist(), "the plain loop")
    return _agreement_check([float(ours[c]) for c in cells], [float(theirs[c]) for c in cells], "the plain loop")


def check_against_direct_paths(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Callable[[Tensor], Tensor], edges: Any,
) -> Dict[str, Any]:
    """The exact edges of every head writer against ``fastpatch.patching.get_act_patch_direct_path_all_sources``
    (TransformerLens's direct path patching, for Q/K/V; fastpatch's own for MLP inputs and logits),
    an independent computation of the same edges. Raises ``AssertionError`` if they differ by more
    than 1e-5 of the largest value (fp32); returns the max error and scale."""
    from fastpatch.patching import get_act_patch_direct_path_all_sources

    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)
    baseline = float(metric(corrupted_logits))
    w_index = {name: i for i, name in enumerate(edges.writer_names)}
    r_index = {name: i for i, name in enumerate(edges.reader_names)}
    ours, theirs = [], []
    for component in ("q", "k", "v", "mlp_in", "logits"):
        paths = get_act_patch_direct_path_all_sources(
            model, corrupted_tokens, clean_cache, corrupted_cache, metric, component=component, verbose=False)
        for sl in range(n_layers):
            for sh in range(n_heads):
                w = w_index[f"L{sl}H{sh}"]
                if component == "logits":
                    cells = [("logits", paths[sl, sh])]
                elif component == "mlp_in":
                    cells = [(f"MLP{dl}.in", paths[sl, sh, dl]) for dl in range(sl, n_layers)]
                else:
                    cells = [(f"L{dl}H{dh}.{component}", paths[sl, sh, dl, dh])
                             for dl in range(sl + 1, n_layers) for dh in range(n_heads)]
                for reader, value in cells:
                    ours.append(float(edges.scores[w, r_index[reader]]))
                    theirs.append(float(value) - baseline)
    return _agreement_check(ours, theirs, "direct path patching")


@dataclass
class Task:
    """A shipped model with its prompts and metric."""

    name: str
    model: Any
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
    description: Dict[str, Any]


def shipped_tasks(names: Sequence[str]) -> List[Task]:
    """The shipped models' tasks: ``induction`` and ``greater_than``."""
    from fastpatch.metrics import LogitDiff
    from fastpatch.models import (
        GreaterThanProbDiff,
        greater_than_model_info,
        greater_than_prompts,
        induction_model_info,
        induction_prompts,
        load_greater_than_model,
        load_induction_model,
    )

    tasks = []
    for name in names:
        if name == "induction":
            clean, corrupted, answer, wrong = induction_prompts(32, 16, seed=7)
            model, info, metric = load_induction_model(), induction_model_info(), LogitDiff(answer, wrong)
            desc = {"loader": "fastpatch.models.load_induction_model()", "prompts": "induction_prompts(32, 16, seed=7)",
                    "metric": "fastpatch.metrics.LogitDiff(answer, wrong): mean last-position logit difference",
                    "circuit": {k: info["circuit"][k] for k in ("previous_token_heads", "induction_heads")}}
        elif name == "greater_than":
            prompts = greater_than_prompts(64, seed=7)
            clean, corrupted = prompts.clean, prompts.corrupted
            model, info, metric = load_greater_than_model(), greater_than_model_info(), GreaterThanProbDiff(prompts.years)
            desc = {"loader": "fastpatch.models.load_greater_than_model()", "prompts": "greater_than_prompts(64, seed=7)",
                    "metric": "fastpatch.models.GreaterThanProbDiff(years): mean p(y > YY) - p(y <= YY) over the years",
                    "circuit": {k: info["circuit"][k] for k in ("heads", "mlps", "resid_positions")}}
        else:
            raise SystemExit(f"unknown model {name!r}; choose from ['induction', 'greater_than']")
        cfg = model.cfg
        desc.update(architecture=info["architecture"], n_layers=int(cfg.n_layers), d_model=int(cfg.d_model),
                    n_heads=int(cfg.n_heads), d_vocab=int(cfg.d_vocab), batch=int(clean.shape[0]),
                    positions=int(clean.shape[1]))
        tasks.append(Task(name, model, clean, corrupted, metric, desc))
    return tasks


def node_estimates(sweep: str, ig_steps: int) -> Dict[str, Any]:
    """method -> ``(model, clean, corrupted, metric) -> estimate`` for a node sweep, or the reason it does not apply."""
    from fastpatch import attribution as fa

    out: Dict[str, Any] = {
        "attribution": lambda m, c, k, f: getattr(fa, f"get_attr_patch_{sweep}")(m, c, k, f),
        "atp*": (lambda m, c, k, f: getattr(fa, ATPSTAR[sweep])(m, c, k, f)) if sweep in ATPSTAR else
        "AtP*'s QK fix concerns query and key nodes only (see the head queries / keys rows)",
        "ig": lambda m, c, k, f: fa.get_attr_patch_ig(m, c, k, f, sweep, ig_steps=ig_steps),
        "graddrop": (lambda m, c, k, f: fa.get_attr_patch_graddrop(m, c, k, f, sweep)) if sweep in fa.GRADDROP_SWEEPS
        else "GradDrop needs a node inside one layer's contribution; the residual stream is not",
    }
    return out


def faithfulness(estimate: Tensor, exact: Tensor, floor: float, valid: Optional[Tensor] = None) -> Dict[str, Any]:
    """Pearson and Spearman correlation of an estimate with the exact values over the *active* cells
    (exact effect or estimate nonzero after the noise floor; ``valid`` cells only), and over all cells."""
    est, ex = denoise(estimate, floor), denoise(exact, floor)
    if est.shape != ex.shape:
        raise ValueError(f"estimate {tuple(est.shape)} and exact {tuple(ex.shape)} differ")
    if valid is not None:  # [writer, reader], expanded over positions for per-position edges
        valid = valid.cpu()
        valid = valid[..., None].expand_as(ex) if valid.ndim < ex.ndim else valid
        est, ex = est[valid], ex[valid]
    est, ex = est.reshape(-1), ex.reshape(-1)
    active = (est != 0) | (ex != 0)
    return {"pearson": pearson(est[active], ex[active]), "spearman": spearman(est[active], ex[active]),
            "pearson_all": pearson(est, ex), "spearman_all": spearman(est, ex),
            "cells": int(ex.numel()), "active_cells": int(active.sum())}


def top_k_recall(estimate: Tensor, exact: Tensor, valid: Tensor, fractions: Sequence[float] = TOP_K_FRACTIONS) -> Dict[str, Any]:
    """For each fraction f: of the k = max(1, round(f * valid edges)) edges of largest |exact|, the
    share that are also among the k of largest |estimate| (valid edges only; ties by index)."""
    est, ex = estimate.detach().double().cpu(), exact.detach().double().cpu()
    valid = valid.cpu()
    valid = valid[..., None].expand_as(ex) if valid.ndim < ex.ndim else valid  # per-position edges
    est, ex = est[valid], ex[valid]
    out = {}
    for f in fractions:
        k = max(1, round(f * ex.numel()))
        top_est, top_ex = set(top_cells(est, k)), set(top_cells(ex, k))
        out[f"{f:.0%}"] = {"k": k, "recall": len(top_est & top_ex) / k}
    return out


def run_faithfulness(task: Task, ig_steps: int, grids: bool = False) -> Dict[str, Any]:
    """Every component type and method on one shipped model: the rows of the table. The JSON keeps
    every grid but the per-position edges' (thousands of cells; with ``grids`` those too)."""
    from fastpatch import patching as fp

    model, clean, corrupted, metric = task.model, task.clean, task.corrupted, task.metric
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        clean_metric, corrupted_metric = float(metric(model(clean))), float(metric(model(corrupted)))
    floor = NOISE * max(abs(clean_metric), abs(corrupted_metric))
    rows: List[Dict[str, Any]] = []
    for component, sweep in NODE_COMPONENTS.items():
        with torch.no_grad():
            result, t_exact = _timed(lambda: getattr(fp, f"get_act_patch_{sweep}")(
                model, corrupted, clean_cache, metric, baseline=True, progress=False))
        exact = (result.values - result.baseline).detach().double().cpu()
        assert float(exact.abs().max()) > floor, f"{task.name} {sweep}: exact patching changes nothing"
        row: Dict[str, Any] = {"component": component, "exact": f"fastpatch.patching.get_act_patch_{sweep}",
                               "shape": list(exact.shape), "exact_seconds": t_exact, "methods": {}, "not_applicable": {}}
        for method, estimator in node_estimates(sweep, ig_steps).items():
            if isinstance(estimator, str):
                row["not_applicable"][method] = estimator
                continue
            estimate, seconds = _timed(lambda: estimator(model, clean, corrupted, metric))
            row["methods"][method] = {"seconds": seconds, **faithfulness(estimate, exact, floor),
                                      "values": _rounded(estimate)}
        row["exact_values"] = _rounded(exact)
        rows.append(row)
        print(f"  {task.name}: {component} done", flush=True)

    for per_position in (False, True):
        rows.append(edge_row(task, per_position, ig_steps, floor, grids=grids or not per_position))
        print(f"  {task.name}: {rows[-1]['component']} done", flush=True)
    return {"model": task.name, "config": task.description, "clean_metric": clean_metric,
            "corrupted_metric": corrupted_metric, "noise_floor": floor, "rows": rows}


PER_POSITION_SAMPLE = 40  # per-position exact edges checked against the plain loop: the 20 largest, 20 at random


def _sample_cells(exact: Tensor, valid: Tensor, n: int, seed: int = 0) -> List[Tuple[int, ...]]:
    """``n // 2`` valid cells of largest ``|exact|`` and ``n - n // 2`` other valid cells drawn with ``seed``."""
    cells = torch.nonzero(valid[..., None].expand_as(exact) if valid.ndim < exact.ndim else valid)
    order = torch.argsort(exact[tuple(cells.T)].abs(), descending=True, stable=True)
    top, rest = order[: n // 2], order[n // 2 :]
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[: n - n // 2]]
    return [tuple(int(i) for i in cells[j]) for j in torch.cat([top, rest]).tolist()]


def edge_row(task: Task, per_position: bool, ig_steps: int, floor: float, grids: bool = True) -> Dict[str, Any]:
    """The edges row (whole edges, or one edge per position: PEAP's granularity): the exact edges,
    checked against the plain loop (every edge; a sample per position) and direct path patching
    (head writers, whole edges), and edge attribution / EAP-IG against them. ``grids``: keep the
    exact and estimated values in the row."""
    from fastpatch import attribution as fa

    model, clean, corrupted, metric = task.model, task.clean, task.corrupted, task.metric
    edges, t_exact = _timed(lambda: EXACT_EDGES(model, clean, corrupted, metric, per_position=per_position))
    exact, valid = edges.scores.detach().double().cpu(), edges.valid.cpu()
    row: Dict[str, Any] = {
        "component": "edges (by position)" if per_position else "edges", "exact": EXACT_EDGES_NAME,
        "shape": list(exact.shape), "exact_seconds": t_exact, "valid_edges": int(valid.sum()), "methods": {},
        "not_applicable": {"atp*": "AtP*'s QK fix is defined for query and key nodes, not for edges",
                           "graddrop": "GradDrop is a node method (fastpatch.attribution.get_attr_patch_graddrop)"}}
    if not per_position:
        row["head_writer_edges_vs_direct_path_patching"] = check_against_direct_paths(model, clean, corrupted, metric, edges)
    for method, kwargs in (("attribution", {}), ("ig", {"ig_steps": ig_steps})):
        estimate, seconds = _timed(lambda: fa.get_attr_patch_edges(
            model, clean, corrupted, metric, per_position=per_position, **kwargs))
        if estimate.writer_names != edges.writer_names or estimate.reader_names != edges.reader_names or \
                not torch.equal(estimate.valid.cpu(), valid) or estimate.scores.shape != edges.scores.shape:
            raise AssertionError(f"{task.name}: attribution's edge layout differs from the exact edges'")
        row["methods"][method] = {"seconds": seconds, **faithfulness(estimate.scores, exact, floor, valid),
                                  "top_k_recall": top_k_recall(estimate.scores, exact, valid),
                                  **({"values": _rounded(estimate.scores)} if grids else {})}
    row.update(writers=edges.writer_names, readers=edges.reader_names, **({"exact_values": _rounded(exact)} if grids else {}))
    if EXACT_EDGES is not plain_loop_edges:  # the batched exact edges, checked against the plain loop
        cells = _sample_cells(exact, valid, PER_POSITION_SAMPLE) if per_position else None
        loop, row["plain_loop_seconds"] = _timed(lambda: plain_loop_edges(
            model, clean, corrupted, metric, per_position=per_position, cells=cells))
        key = f"sample_of_{len(cells)}_vs_plain_loop" if per_position else "all_edges_vs_plain_loop"
        row[key] = check_against_plain_loop(edges, loop, cells)
    return row


def _rounded(x: Tensor) -> Any:
    """Nested lists of 6-significant-digit floats (the JSON keeps every grid, small for these models)."""
    def rounded(v: Any) -> Any:
        return [rounded(u) for u in v] if isinstance(v, list) else float(f"{v:.6g}")

    return rounded(x.detach().double().cpu().tolist())


def faithfulness_markdown(record: Dict[str, Any]) -> str:
    """The README's faithfulness table: one row per (model, component type); Pearson / Spearman per method."""
    header = "| model | component | cells (active) | " + " | ".join(f"{METHOD_LABELS[m]} r / ρ" for m in FAITHFULNESS_METHODS) + (
        " | edge top-k recall, AtP (k = 1% / 5% / 10%) | edge top-k recall, EAP-IG |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for model in record["models"]:
        for row in model["rows"]:
            methods = row["methods"]
            any_method = next(iter(methods.values()))
            cells = [model["model"].replace("_", "-"), row["component"], f"{any_method['cells']} ({any_method['active_cells']})"]
            for m in FAITHFULNESS_METHODS:
                cells.append(f"{methods[m]['pearson']:.2f} / {methods[m]['spearman']:.2f}" if m in methods else "–")
            for m in ("attribution", "ig"):
                recall = methods.get(m, {}).get("top_k_recall")
                cells.append(" / ".join(f"{v['recall']:.2f}" for v in recall.values()) if recall else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_MARKERS = ("<!-- faithfulness-table:start -->", "<!-- faithfulness-table:end -->")


def write_readme_table(text: str, readme: Path = Path(__file__).resolve().parent.parent / "README.md") -> None:
    """Replace the table between the faithfulness markers of ``readme``."""
    start, end = README_MARKERS
    content = readme.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    print(f"updated the faithfulness table in {readme}")


def faithfulness_main(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    models = [run_faithfulness(task, args.ig_steps, args.grids) for task in shipped_tasks(args.models)]
    record = {
        "benchmark": "attribution_faithfulness",
        "command": command,
        **cli.machine_record("cpu", torch.device("cpu")),
        "config": {
            "ig_steps": args.ig_steps,
            "methods": {m: METHOD_LABELS[m] for m in FAITHFULNESS_METHODS},
            "node_components": {c: f"fastpatch.patching.get_act_patch_{s} (values - baseline)" for c, s in NODE_COMPONENTS.items()},
            "node_estimates": {
                "attribution": "fastpatch.attribution.get_attr_patch_<sweep>",
                "atp*": "fastpatch.attribution.get_attr_patch_attn_head_{q,k}_all_pos_atpstar (the QK fix alone)",
                "ig": f"fastpatch.attribution.get_attr_patch_ig(..., sweep, ig_steps={args.ig_steps}), midpoint rule",
                "graddrop": "fastpatch.attribution.get_attr_patch_graddrop(..., sweep) (signed average of the L - 1 drops)",
            },
            "edges": {
                "exact": EXACT_EDGES_NAME,
                "exact_note": "every edge checked against plain_loop_edges (all_edges_vs_plain_loop)"
                if EXACT_EDGES is not plain_loop_edges else "the plain loop alone (EXACT_EDGES = plain_loop_edges)",
                "attribution": "fastpatch.attribution.get_attr_patch_edges (summed over positions)",
                "ig": f"fastpatch.attribution.get_attr_patch_edges(..., ig_steps={args.ig_steps}) (EAP-IG)",
                "check": "every head-writer edge equals fastpatch.patching.get_act_patch_direct_path_all_sources "
                         "(q, k, v, mlp_in, logits) minus the baseline, to 1e-5 of scale",
            },
            "correlations": "pearson / spearman over the active cells (exact or estimate nonzero after the noise floor; "
                            "valid edges only); pearson_all / spearman_all over every cell",
            "noise": f"values with |x| <= {NOISE:g} * max(|clean metric|, |corrupted metric|) count as 0",
            "top_k_recall": "k = max(1, round(f * valid edges)) for f in 1%, 5%, 10%: share of the exact top-k "
                            "edges by |value| that are in the estimate's top-k",
            "spearman": "Pearson correlation of average ranks (ties share their mean rank), torch",
        },
        "models": models,
    }
    print(faithfulness_markdown(record))
    cli.write_record(args.out or cli.RESULTS_DIR / "cpu-faithfulness.json", record)
    if args.readme:
        write_readme_table(faithfulness_markdown(record))
    return record


def _function_name(method: str, sweep: str, ig_steps: int) -> str:
    if method == "attribution":
        return f"fastpatch.attribution.get_attr_patch_{sweep}"
    if method == "atp*":
        return f"fastpatch.attribution.{ATPSTAR[sweep]}"
    return f"fastpatch.attribution.get_attr_patch_ig(..., {sweep!r}, ig_steps={ig_steps})"


def _fmt(x: float) -> str:
    return "   nan" if x != x else f"{x:+.3f}"


def format_table(record: Dict[str, Any]) -> str:
    """One line per (sweep, method): Spearman all / active / major cells, Pearson, top-3 overlap."""
    header = (f"{'sweep':<27}{'method':<13}{'cells':>6}{'active':>7}{'major':>6}{'spearman':>10}{'sp.active':>10}"
              f"{'sp.major':>9}{'pearson':>9}{'top3':>6}  top-3 cells (estimate | exact)")
    lines = [header, "-" * len(header)]
    for row in record["results"]:
        for method, m in row["methods"].items():
            lines.append(
                f"{row['sweep']:<27}{method:<13}{m['cells']:>6}{m['active_cells']:>7}{m['major_cells']:>6}"
                f"{_fmt(m['spearman']):>10}{_fmt(m['spearman_active']):>10}{_fmt(m['spearman_major']):>9}"
                f"{_fmt(m['pearson']):>9}{m['top3_overlap']:>4}/3  "
                f"{' '.join(map(str, map(tuple, m['top3'])))} | {' '.join(map(str, map(tuple, row['exact_top3'])))}"
            )
    lines += ["", "values at the exact top-3 cells (exact, then each estimate):"]
    for row in record["results"]:
        cells = [str(tuple(c)) for c in row["exact_top3"]]
        parts = ["exact " + " ".join(f"{v:+.3f}" for v in row["exact_top3_values"])]
        parts += [f"{method} " + " ".join(f"{v:+.3f}" for v in m["at_exact_top3"]) for method, m in row["methods"].items()]
        lines.append(f"{row['sweep']:<27}{' '.join(cells):<36}" + " | ".join(parts))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    command = cli.command_line("attribution_quality.py", argv)
    if args.faithfulness:
        return faithfulness_main(args, command)
    args.out = args.out or cli.RESULTS_DIR / "cpu-attribution-rank-correlation-induction.json"
    print(f"induction model; induction_prompts({args.prompts}, {args.half_len}, seed={args.seed}); "
          f"ig_steps {args.ig_steps}", flush=True)
    record = run(args, command)
    print(f"clean metric {record['clean_metric']:.3f}, corrupted metric {record['corrupted_metric']:.3f}")
    print(format_table(record))
    cli.write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
