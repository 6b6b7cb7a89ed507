"""The ``fastpatch`` command line.

- ``fastpatch demo``: the main job on the shipped induction model (sweeps, direct paths,
  attribution, speed against TransformerLens, an HTML report); see :mod:`fastpatch.cli.demo`.
- ``fastpatch sweep``: one sweep on a local Hugging Face model folder and prompt pairs from a file.

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

    demo = sub.add_parser(
        "demo",
        help="find the shipped induction model's circuit, offline, and write an HTML report",
        description="Runs exact sweeps, direct path patching and attribution on the small induction model "
        "shipped with fastpatch (no download), times the sweeps against TransformerLens, prints the heads "
        "that matter and their roles, checks them against the circuit recorded when the model was trained, "
        "and writes an HTML report.",
    )
    demo.add_argument("--out", type=Path, default=Path("fastpatch-demo"), help="report path prefix (.html is added)")
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


def run_sweep(args: argparse.Namespace) -> None:
    pairs = _load_prompts(args.prompts)
    model, tokenizer = _load_model(args.model_dir, args.device)
    clean, corrupted, answer, wrong = (t.to(args.device) for t in _tokenize(tokenizer, pairs))
    import torch

    from fastpatch import analysis, figures
    from fastpatch import patching as fp
    from fastpatch.metrics import LogitDiff

    metric = LogitDiff(answer, wrong)
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


if __name__ == "__main__":
    sys.exit(main())
