"""The ``fastpatch`` command line.

- ``fastpatch demo``: the main job on the shipped induction model (sweeps, direct paths,
  attribution, speed against TransformerLens, an HTML report); see :mod:`fastpatch.cli.demo`.
- ``fastpatch sweep``: one sweep on a local Hugging Face model folder and prompt pairs from a file.
- ``fastpatch circuit``: edge scores, the faithfulness curve of their top-n circuits under several
  ablations (MIB sizes, random baselines, CPR/CMD) and the circuit graph, on the same inputs.

Bad input gives a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

SWEEPS = {
    "heads": "get_act_patch_attn_head_out_all_pos",
    "heads-every": "get_act_patch_attn_head_all_pos_every",
    "resid": "get_act_patch_resid_pre",
    "blocks": "get_act_patch_block_every",
    "heads-by-pos": "get_act_patch_attn_head_out_by_pos",
}
CIRCUIT_ABLATIONS = ("corrupted", "zero", "mean", "resample")  # fastpatch.circuits.ABLATIONS (imported lazily)
CIRCUIT_SCORES = ("attribution", "exact")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpatch",
        description="Batched, exact activation and path patching for TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser(
        "sweep",
        help="run one sweep on a local Hugging Face model folder and prompt pairs from a file",
        description="Loads a causal LM from a local folder (no download), tokenizes prompt pairs from a "
        "JSON-lines file with fields clean, corrupted, answer, wrong (answer/wrong must be single "
        "tokens; clean and corrupted prompts must have the same number of tokens), runs the sweep "
        "with a logit-difference metric and writes the values as JSON and an HTML report.",
    )
    sweep.add_argument("model_dir", type=Path, help="folder with config.json, weights and tokenizer files")
    sweep.add_argument("prompts", type=Path, help="JSON lines: {\"clean\": ..., \"corrupted\": ..., \"answer\": ..., \"wrong\": ...}")
    sweep.add_argument("--sweep", choices=sorted(SWEEPS), default="heads", help="which sweep to run")
    sweep.add_argument("--out", type=Path, default=Path("fastpatch-sweep"), help="output prefix (.json and .html are added)")
    sweep.add_argument("--backend", choices=("auto", "native", "hooks"), default="auto", help="execution backend")
    sweep.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")

    circuit = sub.add_parser(
        "circuit",
        help="score every edge and draw the faithfulness curve of the top-n circuits on a local model folder",
        description="Loads the model folder and prompt pairs as `fastpatch sweep` does (same metric: the logit "
        "difference answer - wrong), scores every edge (edge attribution or exact patching of each edge), "
        "evaluates the top-n circuits at MIB's sizes (0.1%%..100%% of edges) and random circuits of the same sizes "
        "under each ablation, prints size, normalised faithfulness per ablation and CPR/CMD, and writes JSON and "
        "an HTML report with the faithfulness curve and the circuit graph.",
    )
    circuit.add_argument("model_dir", type=Path, help="folder with config.json, weights and tokenizer files")
    circuit.add_argument("prompts", type=Path, help="JSON lines, as for `fastpatch sweep`")
    circuit.add_argument("--out", type=Path, default=Path("fastpatch-circuit"), help="output prefix (.json and .html are added)")
    circuit.add_argument("--ablation", nargs="+", default=["corrupted"], metavar="KIND",
                         help=f"ablations of the edges outside the circuit, any of {', '.join(CIRCUIT_ABLATIONS)}")
    circuit.add_argument("--score", default="attribution", metavar="{attribution,exact}",
                         help="edge scores: edge attribution (one pass) or each edge patched alone (exact)")
    circuit.add_argument("--random", type=int, default=1, help="random circuits per size as a baseline (0: none)")
    circuit.add_argument("--prune", action="store_true", help="drop dangling edges before evaluating")
    circuit.add_argument("--keep", type=float, default=0.8,
                         help="the graph shows the smallest circuit whose faithfulness under the first ablation "
                         "reaches this (else the most faithful one)")
    circuit.add_argument("--seed", type=int, default=0, help="seed of the random circuits and of resample ablation")
    circuit.add_argument("--backend", choices=("auto", "native", "hooks"), default="auto", help="execution backend")
    circuit.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    circuit.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = sub.add_parser(
        "demo",
        help="find the shipped induction model's circuit, offline, and write an HTML report",
        description="Runs exact sweeps, direct path patching and attribution on the small induction model "
        "shipped with fastpatch (no download), times the sweeps against TransformerLens, prints the heads "
        "that matter and their roles, checks them against the circuit recorded when the model was trained, "
        "measures the faithfulness of the top-n exact edges (corrupted and zero ablation) and each head "
        "zero-ablated, and writes an HTML report with the curve and the circuit graph.",
    )
    demo.add_argument("--out", type=Path, default=Path("fastpatch-demo"), help="report path (.html is added unless it ends in .html)")
    demo.add_argument("--prompts", type=int, default=64, help="number of clean/corrupted prompt pairs")
    demo.add_argument("--half-len", type=int, default=16, help="length n of the repeated sequence (prompts have 2n+1 tokens)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the random prompts")
    demo.add_argument("--threshold", type=float, default=0.3,
                      help="normalised effect (patched - corrupted) / (clean - corrupted) a head needs to count as important")
    demo.add_argument("--no-compare", action="store_true", help="skip the TransformerLens runs (no speed comparison)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "circuit":
            run_circuit(args)
        else:
            run_sweep(args)
    except UsageError as error:
        print(f"fastpatch: error: {error}", file=sys.stderr)
        return 2
    return 0


# ---- fastpatch demo ------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    if args.prompts < 1:
        raise UsageError(f"--prompts must be positive, got {args.prompts}")
    if not 2 <= args.half_len <= 31:
        raise UsageError(f"--half-len must be in [2, 31] (63 non-BOS tokens, two disjoint halves), got {args.half_len}")
    if not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {args.threshold}")
    from fastpatch.cli.demo import run_demo

    start = time.perf_counter()
    result = run_demo(args.out, args.prompts, args.half_len, args.seed, args.threshold,
                      compare=not args.no_compare, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0 if result.recovered else 1


# ---- fastpatch sweep -----------------------------------------------------------------------------
def _load_prompts(path: Path) -> List[dict]:
    if not path.is_file():
        raise UsageError(f"prompt file {path} does not exist")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{n}: not valid JSON ({error.msg})") from None
        missing = [k for k in ("clean", "corrupted", "answer", "wrong") if not isinstance(pair.get(k), str)]
        if missing:
            raise UsageError(f"{path}:{n}: missing string field(s) {missing}")
        pairs.append(pair)
    if not pairs:
        raise UsageError(f"{path} holds no prompt pairs")
    return pairs


def _load_model(model_dir: Path, device: str):
    if not model_dir.is_dir():
        raise UsageError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"model folder {model_dir} has no config.json")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fastpatch._tl_private import build_bridge_from_module

    hf_logging.disable_progress_bar()  # stderr carries our messages only: errors are one line
    hf_logging.set_verbosity_error()

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval().to(device)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a causal LM and tokenizer from {model_dir}: {str(error).splitlines()[0]}") from None
    architecture = (config.architectures or [type(hf_model).__name__])[0]
    bridge = build_bridge_from_module(hf_model, architecture, hf_config=config)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval(), tokenizer


def _tokenize(tokenizer, pairs: List[dict]):
    from fastpatch.datasets import from_pairs

    try:
        data = from_pairs(tokenizer, *([p[k] for p in pairs] for k in ("clean", "corrupted", "answer", "wrong")))
    except ValueError as error:
        raise UsageError(str(error)) from None
    return data.clean_tokens, data.corrupted_tokens, data.answer_tokens, data.wrong_tokens


def _load_inputs(args: argparse.Namespace):
    """``args.model_dir`` and ``args.prompts`` loaded: the model, its tokenizer, clean and corrupted tokens on
    ``args.device`` and the metric (the logit difference answer - wrong at the last position), shared by every
    command on a local model folder."""
    pairs = _load_prompts(args.prompts)
    model, tokenizer = _load_model(args.model_dir, args.device)
    clean, corrupted, answer, wrong = (t.to(args.device) for t in _tokenize(tokenizer, pairs))
    from fastpatch.metrics import LogitDiff

    return model, tokenizer, clean, corrupted, LogitDiff(answer, wrong)


def run_sweep(args: argparse.Namespace) -> None:
    model, tokenizer, clean, corrupted, metric = _load_inputs(args)
    import torch

    from fastpatch import analysis, figures
    from fastpatch import patching as fp

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    name = SWEEPS[args.sweep]
    start = time.perf_counter()
    values = getattr(fp, name)(model, corrupted, clean_cache, metric, progress=not args.quiet, backend=args.backend)
    seconds = time.perf_counter() - start
    axes = {"heads": ("layer", "head"), "resid": ("layer", "pos"), "heads-by-pos": ("layer", "pos", "head"),
            "heads-every": ("patch_type", "layer", "head"), "blocks": ("patch_type", "layer", "pos")}[args.sweep]
    table = analysis.top_k(values, axes, k=10)
    print(f"{name}: {values.numel()} cells in {seconds:.2f} s")
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"sweep": name, "axes": list(axes), "values": values.tolist()}))
    sections = [("Top cells", table)]
    if values.ndim == 2:
        tokens = [tokenizer.decode([t]) for t in corrupted[0].tolist()]
        fig = figures.layer_head_heatmap(values) if axes[1] == "head" else figures.layer_position_heatmap(values, tokens)
        sections.insert(0, (name, fig))
    figures.write_report(f"{args.out}.html", sections, title=f"fastpatch sweep: {name}")
    print(f"wrote {args.out}.json and {args.out}.html")



# ---- fastpatch circuit ---------------------------------------------------------------------------
def _check_choices(what: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    """Our own check, not argparse's ``choices``: its error is a usage block, ours one line."""
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")


def shown_circuit(curve, keep: float) -> int:
    """Index (into ``curve.counts``) of the smallest circuit whose faithfulness under the first ablation is at
    least ``keep``, else of the most faithful one: the circuit ``fastpatch circuit`` draws."""
    faith = curve.faithfulness[0].cpu()
    counts = curve.n_edges.cpu()
    reaching = [i for i in range(len(counts)) if float(faith[i]) >= keep]
    if reaching:
        return min(reaching, key=lambda i: (int(counts[i]), i))
    return int(faith.nan_to_num(float("-inf")).argmax())


def curve_table(curve):
    """One row per circuit size (increasing): edges asked for and kept, fraction, faithfulness per ablation
    (and its random baseline's mean over draws)."""
    import pandas as pd
    import torch

    order = torch.argsort(curve.counts, stable=True).tolist()
    rows = []
    for i in order:
        row = {"edges": int(curve.counts[i]), "kept": int(curve.n_edges[i]), "fraction": float(curve.fractions[i])}
        for a, name in enumerate(curve.ablations):
            row[name] = float(curve.faithfulness[a, i])
            if curve.random_faithfulness.shape[1]:
                row[f"{name} random"] = float(curve.random_faithfulness[a, :, i].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def run_circuit(args: argparse.Namespace) -> None:
    _check_choices("ablation", args.ablation, CIRCUIT_ABLATIONS)
    _check_choices("score", [args.score], CIRCUIT_SCORES)
    if args.random < 0:
        raise UsageError(f"--random must be non-negative, got {args.random}")
    model, tokenizer, clean, corrupted, metric = _load_inputs(args)
    from fastpatch import figures
    from fastpatch.attribution import get_attr_patch_edges
    from fastpatch.circuits import exact_edges, faithfulness_curve
    from fastpatch.circuits.plots import circuit_graph_figure, faithfulness_figure

    start = time.perf_counter()
    if args.score == "exact":
        scores = exact_edges(model, clean, corrupted, metric, backend=args.backend, progress=not args.quiet)
    else:
        scores = get_attr_patch_edges(model, clean, corrupted, metric)
    score_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        curve = faithfulness_curve(model, clean, corrupted, metric, scores, ablation=list(args.ablation),
                                   n_random=args.random, prune=args.prune, seed=args.seed, backend=args.backend,
                                   progress=not args.quiet)
    except ValueError as error:  # e.g. an architecture circuit evaluation refuses
        raise UsageError(str(error).splitlines()[0]) from None
    curve_seconds = time.perf_counter() - start
    table = curve_table(curve)
    areas = [{"ablation": name, "CPR": float(curve.cpr[a]), "CMD": float(curve.cmd[a]),
              **({"random CPR": float(curve.random_cpr[a].mean()), "random CMD": float(curve.random_cmd[a].mean())}
                 if curve.random_cpr.shape[1] else {})} for a, name in enumerate(curve.ablations)]
    import pandas as pd

    areas = pd.DataFrame(areas)
    shown = shown_circuit(curve, args.keep)
    circuit = curve.circuits[shown]
    fmt = {"float_format": lambda v: f"{v:.3g}", "index": False}
    print(f"{args.score} scores of {curve.n_items} edges in {score_seconds:.2f} s; faithfulness curve "
          f"({len(table)} sizes x {len(curve.ablations)} ablations, {args.random} random per size) in {curve_seconds:.2f} s")
    print(table.to_string(**fmt))
    print(areas.to_string(**fmt))
    print(f"graph: the circuit of {int(circuit.sum())} edges, faithfulness {float(curve.faithfulness[0, shown]):.3g} "
          f"under {curve.ablations[0]} ablation")
    edges = scores.to_frame()
    kept = circuit[scores.valid].cpu().tolist()
    record = {
        "score": args.score, "ablations": curve.ablations, "n_edges_total": curve.n_items,
        "counts": curve.counts.tolist(), "n_edges": curve.n_edges.tolist(), "fractions": curve.fractions.tolist(),
        "clean": curve.clean.tolist(), "ablated": curve.ablated.tolist(), "values": curve.values.tolist(),
        "faithfulness": curve.faithfulness.tolist(), "cpr": curve.cpr.tolist(), "cmd": curve.cmd.tolist(),
        "random_n_edges": curve.random_n_edges.tolist(), "random_faithfulness": curve.random_faithfulness.tolist(),
        "random_cpr": curve.random_cpr.tolist(), "random_cmd": curve.random_cmd.tolist(),
        "shown_circuit": {"index": shown, "edges": [[w, r, float(v)] for w, r, v, k in
                                                   zip(edges.writer, edges.reader, edges.score, kept) if k]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(record))
    sections = [
        ("Faithfulness curve", faithfulness_figure(curve)),
        ("Normalised faithfulness by size", table),
        ("CPR / CMD", areas),
        (f"Circuit graph: {int(circuit.sum())} edges ({args.score} scores)",
         circuit_graph_figure(model, circuit.cpu(), scores.scores.cpu(), title=f"Circuit of {int(circuit.sum())} edges")),
        ("Top edges", scores.top_edges(20)),
    ]
    figures.write_report(f"{args.out}.html", sections, title=f"fastpatch circuit: {args.model_dir.name}")
    print(f"wrote {args.out}.json and {args.out}.html")

if __name__ == "__main__":
    sys.exit(main())
