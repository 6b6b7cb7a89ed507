"""Time TransformerLens's edge attribution against ``fastpatch.attribution.get_attr_patch_edges``.

Both run in one process on the same random-init GPT-2, the same prompt pairs and the same metric.
TransformerLens's ``attribution_patch(model, clean, corrupted, metric,
EdgeAttributionConfig(granularity="edge"))`` runs a clean forward and a corrupted forward+backward
per prompt and scores one edge per (writer, reader, position); fastpatch runs three passes for the
whole batch and scores each edge summed over positions. The script checks that TransformerLens's
per-position edge scores, summed over positions, equal ours (and that the two edge sets are the
same), times both interleaved (TransformerLens, then fastpatch, ``--repeats`` rounds, best of
each), prints a table and writes a JSON record under ``bench/results/`` in the same layout as
``compare_transformer_lens.py`` (whose environment and timing helpers it reuses), so
``results_table.py`` lists it. CPU figures are ratios only; absolute times count on a GPU.

Examples::

    python bench/compare_attribution.py                # 4 layers, d_model 128, 8 heads, 16 prompts
    python bench/compare_attribution.py --small        # smoke test, seconds
    python bench/compare_attribution.py --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm (see compare_transformer_lens)

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import compare_transformer_lens as cli
from bench.models import logit_diff_metric, shaped_model, shaped_prompts

SWEEPS = ("get_attr_patch_edges",)
TL_CALL = 'transformer_lens attribution_patch(model, clean, corrupted, metric, EdgeAttributionConfig(granularity="edge"))'

SHAPES: Dict[str, Dict[str, int]] = {
    "default": dict(layers=4, d_model=128, heads=8, vocab=50257, batch=16, positions=15),
    "small": cli.SHAPES["small"],  # what --small sets (cli.resolve_shape)
}

_QKV_KINDS = {"q_input": "q", "k_input": "k", "v_input": "v"}


# ----------------------------------------------------------------------------- TL -> our grid


def _writer_name(node: Any) -> str:
    """A TransformerLens writer ``Node`` -> our ``EdgeScores.writer_names`` entry."""
    if node.kind == "embed":
        return "embed"
    if node.kind == "attn_head_out":
        return f"L{node.layer}H{node.head}"
    if node.kind == "mlp_out":
        return f"MLP{node.layer}"
    raise ValueError(f"not a writer node: {node}")


def _reader_name(node: Any) -> str:
    """A TransformerLens reader ``Node`` -> our ``EdgeScores.reader_names`` entry."""
    if node.kind in _QKV_KINDS:
        return f"L{node.layer}H{node.head}.{_QKV_KINDS[node.kind]}"
    if node.kind == "mlp_in":
        return f"MLP{node.layer}.in"
    if node.kind == "logits":
        return "logits"
    raise ValueError(f"not a reader node: {node}")


def tl_edges_on_our_grid(ours: Any, edge_scores: Dict[Tuple[Any, Any], float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's per-position edge scores summed over positions, on ``ours``'s
    ``[writers, readers]`` grid, and the mask of the (writer, reader) pairs it scored at all.

    Same mapping as ``tests/test_attribution_edges.py``: TransformerLens pairs a writer and a
    reader at the same position only, so the sum over positions is our position-summed cell.
    """
    W = {n: i for i, n in enumerate(ours.writer_names)}
    R = {n: i for i, n in enumerate(ours.reader_names)}
    theirs = torch.zeros(ours.scores.shape, dtype=torch.float64)
    seen = torch.zeros(ours.scores.shape, dtype=torch.bool)
    for (writer, reader), score in edge_scores.items():
        i, j = W[_writer_name(writer)], R[_reader_name(reader)]
        theirs[i, j] += score
        seen[i, j] = True
    return theirs, seen


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` documents every option."""
    d = SHAPES["default"]
    p = cli.new_parser(
        "Time TransformerLens's attribution_patch(..., EdgeAttributionConfig(granularity='edge')) "
        "against fastpatch.attribution.get_attr_patch_edges on one random-init GPT-2, check that "
        "the edge scores agree, print a table and write a JSON result under bench/results/."
    )
    cli.add_shape_arguments(p, d, batch_help="prompt pairs")
    p.add_argument("--repeats", type=int, default=5,
                   help="timing rounds; each round runs TransformerLens once, then fastpatch once; the best "
                        "round of each library is kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both libraries (default: torch's own choice, the cores)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the value check")
    p.add_argument("--atol-scale", type=float, default=1e-5,
                   help="absolute tolerance of the value check, as a fraction of the largest |TransformerLens score|")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result path (default: bench/results/<device>-edge-attribution-b<batch>[-small].json)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    cli.resolve_shape(args)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.out is None:
        args.out = cli.RESULTS_DIR / f"{args.device}-edge-attribution-b{args.batch}{'-small' if args.small else ''}.json"
    return args


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace, command: Optional[str] = None) -> Dict[str, Any]:
    """Build the model and prompts, check and time both libraries, return the result record."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    from fastpatch.attribution import get_attr_patch_edges

    device = torch.device(args.device)
    model = shaped_model(args, device)
    pair = shaped_prompts(args, device)
    clean, corrupted = pair.clean, pair.corrupted
    # TransformerLens calls the metric on ONE prompt's logits at a time, so the metric cannot index
    # a per-prompt answer: every prompt uses the first prompt's answer / wrong ids ([1] tensors
    # broadcast over any batch). For fastpatch it is the batch mean of the same per-prompt value.
    answer, wrong = pair.answer[:1], pair.wrong[:1]
    metric = logit_diff_metric(answer, wrong)
    config = EdgeAttributionConfig(granularity="edge")

    def tl_call():
        return attribution_patch(model, clean, corrupted, metric, config)

    def fp_call():
        return get_attr_patch_edges(model, clean, corrupted, metric)

    with torch.no_grad():
        clean_metric = float(metric(model(clean)))
        corrupted_metric = float(metric(model(corrupted)))

    # Warm-up (allocator, autograd, hook machinery) on the first two prompts, then one full call of
    # each whose values are compared.
    with cli._quiet_tqdm():
        attribution_patch(model, clean[:2], corrupted[:2], metric, config)
    get_attr_patch_edges(model, clean[:2], corrupted[:2], metric)
    cli._sync(device)

    load_before = cli._load_average()
    tl_times: List[float] = []
    fp_times: List[float] = []
    tl_best = fp_best = (float("inf"), float("nan"))
    tl_out = fp_out = None
    caught: List[warnings.WarningMessage] = []
    for _ in range(args.repeats):  # interleaved: a load spike on the shared machine hits both
        with cli._quiet_tqdm():
            wall, cpu, tl_out = cli.best_time(tl_call, 1, device)
        tl_times.append(wall)
        tl_best = min(tl_best, (wall, cpu))
        with warnings.catch_warnings(record=True) as round_caught:
            warnings.simplefilter("always")
            wall, cpu, fp_out = cli.best_time(fp_call, 1, device)
        caught += round_caught
        fp_times.append(wall)
        fp_best = min(fp_best, (wall, cpu))
    for message in sorted({str(w.message) for w in caught}):
        print(f"fastpatch warning (get_attr_patch_edges): {message}", file=sys.stderr)
    load_after = cli._load_average()

    theirs, seen = tl_edges_on_our_grid(fp_out, tl_out.edge_scores)
    ours = fp_out.scores.detach().double().cpu()
    valid = fp_out.valid.cpu()
    scale = float(theirs.abs().max())
    atol = args.atol_scale * scale
    check = cli.compare(theirs, ours, args.rtol, atol)
    edge_sets_equal = bool(torch.equal(seen, valid))
    values_agree = bool(check["agree"] and edge_sets_equal)

    n_valid = int(valid.sum())
    row = {
        "sweep": "get_attr_patch_edges",
        "tl_function": TL_CALL,
        "metric": "plain",
        "cells": n_valid,
        "tl_edges": len(tl_out.edge_scores),
        "edge_grid": list(fp_out.scores.shape),
        "tl_seconds": tl_best[0],
        "fastpatch_seconds": fp_best[0],
        "ratio": tl_best[0] / fp_best[0],
        "tl_cpu_seconds": tl_best[1],
        "fastpatch_cpu_seconds": fp_best[1],
        "tl_seconds_all": tl_times,
        "fastpatch_seconds_all": fp_times,
        "lower_bound_flops": None,
        "fastpatch_gflops_per_s": None,
        **check,
        "atol": atol,
        "edge_sets_equal": edge_sets_equal,
        "values_agree": values_agree,
        "fastpatch_warnings": sorted({str(w.message) for w in caught}),
    }
    row["agree"] = values_agree
    return {
        "benchmark": "compare_attribution",
        "command": command,
        **cli.machine_record(args.device, device),
        "load_average": {"before": load_before, "after": load_after},
        "config": {
            "model": {**cli.model_record(args), "d_head": args.d_model // args.heads,
                      "n_params": sum(p.numel() for p in model.parameters())},
            "batch": args.batch,
            "positions": args.positions,
            "corrupt_from": args.corrupt_from,
            "sweeps": list(SWEEPS),
            "metric": "mean over prompts of last-position logit[answer] - logit[wrong], with the first "
                      "prompt's answer/wrong ids for every prompt (TransformerLens calls the metric on one "
                      "prompt's logits at a time); the same callable for both libraries",
            "metrics": ["plain"],
            "comparison": "TransformerLens edge_scores (per writer, reader, position; averaged over prompts) "
                          "summed over positions vs fastpatch EdgeScores.scores; agree when the edge sets are "
                          "equal and |ours - TL| <= atol + rtol * |TL| on every cell",
            "timing": "interleaved rounds (TransformerLens once, then fastpatch once), best round of each",
            "repeats": args.repeats,
            "grad_enabled": True,
            "fastpatch_kwargs": {},
            "fastpatch_backend": "default",
            "rtol": args.rtol,
            "atol_scale": args.atol_scale,
            "small": bool(args.small),
        },
        "clean_metric": clean_metric,
        "corrupted_metric": corrupted_metric,
        "results": [row],
    }


def format_table(record: Dict[str, Any]) -> str:
    """A plain-text table of one result record."""
    header = f"{'sweep':<22}{'edges':>8}{'TL s':>10}{'fastpatch s':>13}{'ratio':>9}{'max |diff|':>12}{'max |TL|':>11}  agree"
    return cli.format_rows(header, [
        f"{r['sweep']:<22}{r['cells']:>8}{r['tl_seconds']:>10.3f}{r['fastpatch_seconds']:>13.4f}"
        f"{r['ratio']:>8.1f}x{r['max_abs_diff']:>12.2e}{r['max_abs_value']:>11.2e}  {'yes' if r['agree'] else 'NO'}"
        for r in record["results"]
    ])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, run the comparison, print the table, write the JSON; returns the record."""
    args = _resolve(build_parser().parse_args(argv))
    command = cli.command_line("compare_attribution.py", argv)
    cfg = f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}"
    print(f"device {args.device} ({cli.device_name(torch.device(args.device))}); model: {cfg}; "
          f"{args.batch} prompts x {args.positions} tokens; {args.repeats} interleaved rounds", flush=True)
    with cli.torch_threads(args.threads):
        record = run(args, command)
    print(format_table(record))
    r = record["results"][0]
    print(f"edge sets equal: {r['edge_sets_equal']}; values agree within rtol={args.rtol:g}, "
          f"atol={r['atol']:.2e} ({args.atol_scale:g} x max |TL score|): {r['values_agree']}")
    print("rounds (s): TL " + " ".join(f"{t:.3f}" for t in r["tl_seconds_all"])
          + " | fastpatch " + " ".join(f"{t:.4f}" for t in r["fastpatch_seconds_all"]))
    cli.write_record(args.out, record)
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(0 if all(r["agree"] for r in record["results"]) else 1)
