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
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TQDM_DISABLE", "1")

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.compare_transformer_lens import RESULTS_DIR, _HelpFormatter, device_name, git_state, versions, write_record
from bench.models import logit_diff_metric

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
    p = argparse.ArgumentParser(
        description=(
            "Rank correlation (Spearman) and top-3 agreement between attribution estimates (plain, AtP*, "
            "integrated gradients) and exact activation patching on fastpatch's trained induction model; "
            "prints a table and writes a JSON result under bench/results/."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--prompts", type=int, default=32, help="number of induction prompt pairs")
    p.add_argument("--half-len", type=int, default=16, help="length of the repeated sequence (prompt = 1 + 2 * half_len)")
    p.add_argument("--seed", type=int, default=7, help="seed of induction_prompts")
    p.add_argument("--ig-steps", type=int, default=8, help="integrated-gradients steps (midpoint rule)")
    p.add_argument("--sweeps", nargs="+", default=list(SWEEPS), metavar="SWEEP",
                   help=f"sweeps to compare; choices: {', '.join(SWEEPS)}")
    p.add_argument("--grids", action="store_true", help="store every exact and estimated grid in the JSON")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu-attribution-rank-correlation-induction.json",
                   help="JSON result path")
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
        "device": "cpu",
        "device_name": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "git": git_state(),
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "bench/attribution_quality.py", *argv])
    print(f"induction model; induction_prompts({args.prompts}, {args.half_len}, seed={args.seed}); "
          f"ig_steps {args.ig_steps}", flush=True)
    record = run(args, command)
    print(f"clean metric {record['clean_metric']:.3f}, corrupted metric {record['corrupted_metric']:.3f}")
    print(format_table(record))
    write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
