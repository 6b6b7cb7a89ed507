"""Time ``fastpatch.circuits.exact_edges`` (every edge, batched) against the plain loop.

The plain loop is the definition run one edge at a time: for each writer -> reader edge, one
hooked forward of the corrupted prompts in which the reader's input alone receives the writer's
clean-minus-corrupted write (a Q/K/V reader's projection recomputed from its block's ``ln1`` at
``resid_pre + write`` and set at ``hook_q/k/v``; an MLP reader at ``ln2.hook_in``; the logits at
``ln_final.hook_in``), then the metric. It is what EAP-IG's ``exact`` method and MIB do, and what
TransformerLens's direct path patching does per (source, destination) pair.

Both run in one process on the same random-init GPT-2 (default: 4 layers, d_model 512, 8 heads,
vocab 50257), the same 16 IOI-shaped prompt pairs of 16 tokens corrupted from position 8, for two
metrics computing the same numbers: a plain callable (the batch-mean last-position logit
difference; fastpatch must compute full logits for it) and ``fastpatch.metrics.LogitDiff`` (which
declares the two logits it reads). Every plain-loop forward costs the same (a full forward of the
batch), so by default the loop is timed on a stratified sample of ``--loop-sample`` edges (every
k-th edge, writer-major, which reaches every reader kind) and its total is that sample's mean time
per edge times the number of edges, per reader kind; ``--loop-sample 0`` times the whole loop.
The sample's values are checked against fastpatch's (rtol 1e-4, atol 1e-5 of scale). Prints a
table and writes a JSON record under ``bench/results/``. CPU figures are ratios; absolute times
count on a GPU.

Examples::

    python bench/exact_edges.py                 # -> bench/results/cpu-exact-edges-4L8H.json
    python bench/exact_edges.py --small         # smoke test, seconds
    python bench/exact_edges.py --loop-sample 0 # the whole plain loop (slow)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm (see compare_transformer_lens)

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import compare_transformer_lens as cli
from bench.models import logit_diff_metric, shaped_model, shaped_prompts

SHAPES: Dict[str, Dict[str, int]] = {
    "default": dict(layers=4, d_model=512, heads=8, vocab=50257, batch=16, positions=16),
    "small": cli.SHAPES["small"],  # what --small sets (cli.resolve_shape)
}
TARGETS = {"logitdiff": 10.0, "plain": 4.0}  # issue 16: at least 10x with LogitDiff, 4x with a plain callable


# ----------------------------------------------------------------------------- the plain loop


def _write(model: Any, clean: Dict[str, torch.Tensor], corrupted: Dict[str, torch.Tensor], writer: str) -> torch.Tensor:
    """A writer's clean-minus-corrupted residual write ``[batch, pos, d_model]`` from its name."""
    if writer == "embed":
        return clean["hook_embed"] - corrupted["hook_embed"]
    if writer.startswith("MLP"):
        name = f"blocks.{int(writer[3:])}.hook_mlp_out"
        return clean[name] - corrupted[name]
    layer, head = (int(x) for x in writer[1:].split("H"))
    W_O, name = model.blocks[layer].attn.W_O[head].detach(), f"blocks.{layer}.attn.hook_z"
    return clean[name][:, :, head] @ W_O - corrupted[name][:, :, head] @ W_O


def _reader_hook(model: Any, corrupted: Dict[str, torch.Tensor], reader: str, delta: torch.Tensor):
    """The one hook that hands ``reader`` (a name of ``EdgeScores.reader_names``) its patched input."""
    if reader == "logits":
        return "ln_final.hook_in", lambda act, hook: act + delta
    if reader.endswith(".in"):
        return f"blocks.{int(reader[3:-3])}.ln2.hook_in", lambda act, hook: act + delta
    head_name, component = reader.split(".")
    layer, head = (int(x) for x in head_name[1:].replace("KV", "H").split("H"))
    attn = model.blocks[layer].attn
    W, b = getattr(attn, f"W_{component.upper()}")[head], getattr(attn, f"b_{component.upper()}", None)
    value = model.blocks[layer].ln1(corrupted[f"blocks.{layer}.hook_resid_pre"] + delta) @ W
    value = value if b is None else value + b[head]

    def set_head(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[:, :, head] = value
        return act

    return f"blocks.{layer}.attn.hook_{component}", set_head


def reader_kind(reader: str) -> str:
    return "logits" if reader == "logits" else "mlp_in" if reader.endswith(".in") else reader.split(".")[1]


def plain_loop(model: Any, clean_tokens, corrupted_tokens, metric: Callable, edges, cells) -> Dict[tuple, Any]:
    """``{(w, r): (metric, wall seconds, process CPU seconds)}``: one hooked forward per edge of ``cells``."""
    names = ["hook_embed"] + [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers)
                              for h in ("hook_resid_pre", "attn.hook_z", "hook_mlp_out")]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        _, corrupted = model.run_with_cache(corrupted_tokens, names_filter=lambda n: n in names)

    @torch.no_grad()
    def one(w: int, r: int) -> float:
        delta = _write(model, clean, corrupted, edges.writer_names[w])
        hook = _reader_hook(model, corrupted, edges.reader_names[r], delta)
        return float(metric(model.run_with_hooks(corrupted_tokens, fwd_hooks=[hook])))

    out = {}
    for w, r in cells:
        seconds, cpu_seconds, value = cli.best_time(lambda: one(w, r), 1, corrupted_tokens.device)
        out[(w, r)] = (value, seconds, cpu_seconds)
    return out


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = SHAPES["default"]
    p = cli.new_parser(
        "Time fastpatch.circuits.exact_edges against a plain loop of one hooked forward per edge, "
        "check the values agree, print the ratios and write a JSON result under bench/results/."
    )
    cli.add_shape_arguments(p, d, batch_help="prompt pairs")
    p.add_argument("--loop-sample", type=int, default=64,
                   help="edges the plain loop is timed on (a stratified sample; 0: every edge)")
    p.add_argument("--repeats", type=int, default=1, help="fastpatch timing rounds (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the value check")
    p.add_argument("--atol-scale", type=float, default=1e-5, help="absolute tolerance, fraction of the largest |value|")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result path (default: bench/results/<device>-exact-edges-<L>L<H>H[-small].json)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    cli.resolve_shape(args, middle=True)  # corrupted from the middle of the prompt
    if args.repeats < 1 or args.loop_sample < 0:
        raise SystemExit("--repeats must be at least 1 and --loop-sample at least 0")
    if args.out is None:
        small = "-small" if args.small else ""
        args.out = cli.RESULTS_DIR / f"{args.device}-exact-edges-{args.layers}L{args.heads}H{small}.json"
    return args


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace, command: Optional[str] = None) -> Dict[str, Any]:
    from fastpatch.circuits import exact_edges
    from fastpatch.metrics import LogitDiff

    device = torch.device(args.device)
    model = shaped_model(args, device)
    clean, corrupted, answer, wrong = shaped_prompts(args, device)
    metrics = {"plain": logit_diff_metric(answer, wrong), "logitdiff": LogitDiff(answer, wrong)}

    exact_edges(model, clean[:2], corrupted[:2], logit_diff_metric(answer[:2], wrong[:2]))  # warm-up
    load_before = cli._load_average()
    rows: List[Dict[str, Any]] = []
    for name, metric in metrics.items():
        fp_s, fp_cpu, edges = cli.best_time(lambda metric=metric: exact_edges(model, clean, corrupted, metric),
                                        args.repeats, device)
        valid = torch.nonzero(edges.valid).tolist()
        stride = 1 if args.loop_sample == 0 else max(1, len(valid) // args.loop_sample)
        sample = [tuple(c) for c in valid[::stride]]
        loop = plain_loop(model, clean, corrupted, metric, edges, sample)
        # the loop's total: per reader kind, the sample's mean seconds per edge times that kind's edges
        seconds, cpu, counts = defaultdict(list), defaultdict(list), defaultdict(int)
        for (w, r), (_, s, c) in loop.items():
            seconds[reader_kind(edges.reader_names[r])].append(s)
            cpu[reader_kind(edges.reader_names[r])].append(c)
        for w, r in valid:
            counts[reader_kind(edges.reader_names[r])] += 1
        loop_s = sum(counts[k] * sum(v) / len(v) for k, v in seconds.items())
        loop_cpu = sum(counts[k] * sum(v) / len(v) for k, v in cpu.items())
        ref = torch.tensor([loop[c][0] - edges.baseline for c in sample])
        ours = torch.stack([edges.scores[c] for c in sample]).cpu()
        check = cli.compare(ref, ours, args.rtol, args.atol_scale * float(ref.abs().max()))
        rows.append({
            "metric": name,
            "edges": len(valid),
            "loop_edges_timed": len(sample),
            "loop_seconds": loop_s,
            "loop_seconds_per_edge": {k: sum(v) / len(v) for k, v in seconds.items()},
            "fastpatch_seconds": fp_s,
            "fastpatch_cpu_seconds": fp_cpu,
            "loop_cpu_seconds": loop_cpu,
            "ratio": loop_s / fp_s,
            # on a shared machine wall time counts the waits for a core; process CPU seconds count the work
            "cpu_ratio": loop_cpu / fp_cpu,
            "target_ratio": TARGETS[name],
            "meets_target": loop_s / fp_s >= TARGETS[name],
            **check,
        })
    return {
        "benchmark": "exact_edges",
        **cli.machine_record(args.device, device),
        "load_average": {"before": load_before, "after": cli._load_average()},
        "config": {
            "model": cli.model_record(args),
            "batch": args.batch, "positions": args.positions, "corrupt_from": args.corrupt_from,
            "loop": "one hooked forward per edge (writer's write into the reader's input alone)",
            "loop_sample": args.loop_sample,
            "metrics": {"plain": "callable: batch-mean last-position logit difference (full logits)",
                        "logitdiff": "fastpatch.metrics.LogitDiff (declares the two logits it reads)"},
        },
        "results": rows,
        "command": command,
    }


def format_table(record: Dict[str, Any]) -> str:
    lines = [f"{'metric':<10} {'edges':>6} {'plain loop s':>13} {'fastpatch s':>12} {'ratio':>7} {'cpu ratio':>10} "
             f"{'target':>7} {'agree':>6}"]
    for row in record["results"]:
        lines.append(
            f"{row['metric']:<10} {row['edges']:>6} {row['loop_seconds']:>13.2f} {row['fastpatch_seconds']:>12.2f} "
            f"{row['ratio']:>6.1f}x {row['cpu_ratio']:>9.1f}x {row['target_ratio']:>6.0f}x {str(row['agree']):>6}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = _resolve(build_parser().parse_args(argv))
    with cli.torch_threads(args.threads):
        record = run(args, cli.command_line("exact_edges.py", argv))
    print(format_table(record))
    cli.write_record(args.out, record)
    if not all(row["agree"] for row in record["results"]):
        raise SystemExit("exact edges and the plain loop disagree")
    return record


if __name__ == "__main__":
    main()
