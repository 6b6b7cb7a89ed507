"""Time a faithfulness curve (``fastpatch.circuits.faithfulness_curve``) against a loop of one forward per circuit.

On the shipped induction model (``fastpatch.models.load_induction_model``, 2 layers), induction
prompt pairs and the last-position logit difference: edges scored by edge attribution
(``fastpatch.attribution.get_attr_patch_edges``, not timed), then MIB's ten circuit sizes under
three ablations (corrupted, zero, mean) with ``--n-random`` random baselines per size, plus the
empty and full circuits the normalisation needs: ``3 x (2 + 10 + 10 n_random)`` circuit runs.

- fastpatch: ``faithfulness_curve``: every circuit and ablation stacked along the batch dimension,
  chunked to the memory budget (the default budget: one pass); identical circuits (MIB's smallest
  sizes round to 0 edges on a small model) run once, the full circuit (the clean run) once;
- the loop: MIB's procedure (``evaluate_area_under_curve``), one forward per circuit: for each
  ablation the full and the empty circuit, then each size's top-n circuit and random circuit, each
  by ``evaluate`` of that one circuit (the same hooks; the ablation caches computed once and passed
  in, so the loop runs no extra forward). The record checks that both give the same values.

Printed and recorded per side: forward passes, batch rows, and FLOPs (the dense matmul FLOPs of a
forward per row times the rows, plus the reader hooks' masked sums). Batching does not reduce
FLOPs on the hook backend; the speed comes from fewer, larger passes. CPU figures are ratios.

Examples::

    python bench/circuit_curves.py              # -> bench/results/cpu-circuit-curves-induction.json
    python bench/circuit_curves.py --small      # smoke test
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.compare_transformer_lens import (
    RESULTS_DIR,
    _load_average,
    best_time,
    compare,
    machine_record,
    write_record,
)

ABLATIONS = ["corrupted", "zero", "mean"]
TARGET = 2.0  # issue 17: at least 2x a loop of one forward per circuit on CPU


def forward_flops_per_row(cfg: Any, n_pos: int) -> int:
    """Dense matmul FLOPs of one forward of one row: Q/K/V/O projections, attention scores and mixing, MLP, unembedding."""
    d, heads, d_head = int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    kv = int(getattr(cfg, "n_key_value_heads", None) or heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    per_layer = 2 * d * d_head * (heads + 2 * kv) + 2 * heads * d_head * d + 2 * 2 * heads * d_head * n_pos + 2 * 2 * d * d_mlp
    return n_pos * (int(cfg.n_layers) * per_layer + 2 * d * int(cfg.d_vocab))


def hook_flops_per_row(model: Any, n_pos: int) -> int:
    """The reader hooks' masked sums per row: each hook point's readers from the writers before it."""
    from fastpatch.circuits import full_circuit
    from fastpatch.engine.circuit_plan import CircuitPlan

    plan = CircuitPlan(model, torch.zeros(1, n_pos, dtype=torch.long), full_circuit(model)[None], [])
    return 2 * n_pos * plan.hook_macs_per_position()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="induction prompt pairs")
    p.add_argument("--half-len", type=int, default=8, help="tokens of each half of an induction prompt")
    p.add_argument("--n-random", type=int, default=1, help="random baseline circuits per size")
    p.add_argument("--repeats", type=int, default=1, help="timing rounds per side (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--small", action="store_true", help="smoke test: 4 prompts, 4 sizes")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>-circuit-curves-induction.json)")
    return p


def run(args: argparse.Namespace, command: Optional[str] = None) -> Dict[str, Any]:
    import fastpatch
    from fastpatch.attribution import get_attr_patch_edges
    from fastpatch.circuits import MIB_SIZES, evaluate, faithfulness_curve, full_circuit
    from fastpatch.circuits.evaluate import ablation_caches
    from fastpatch.circuits.faithfulness import edge_counts, random_circuits
    from fastpatch.metrics import LogitDiff
    from fastpatch.models import induction_prompts, load_induction_model

    device = torch.device(args.device)
    model = load_induction_model(device)
    clean, corrupted, answer, wrong = (t.to(device) for t in induction_prompts(args.prompts, args.half_len, seed=0))
    metric = LogitDiff(answer, wrong)
    scores = get_attr_patch_edges(model, clean, corrupted, metric)
    sizes = MIB_SIZES[::3] if args.small else MIB_SIZES

    def curve():
        return faithfulness_curve(model, clean, corrupted, metric, scores, sizes=sizes, ablation=ABLATIONS,
                                  n_random=args.n_random)

    def loop(reference) -> Dict[str, torch.Tensor]:
        """One ``evaluate`` (one forward) per circuit of the curve, per ablation, MIB's order."""
        caches = ablation_caches(model, ABLATIONS, clean, corrupted)
        runs = 0
        values = torch.zeros(len(ABLATIONS), reference.values.shape[1])
        random = torch.zeros(reference.random_values.shape)
        for a, cache in enumerate(caches):
            def one(circuit):
                nonlocal runs
                runs += 1
                return float(evaluate(model, clean, None, metric, circuit[None], ablation=cache)[0])

            full = full_circuit(model)
            one(full), one(torch.zeros_like(full))  # MIB's baseline and empty-circuit scores
            for i in range(len(sizes)):
                values[a, i] = one(reference.circuits[i])
                for d in range(args.n_random):
                    random[a, d, i] = one(random_circuits_of[d, i])
        return {"values": values, "random_values": random, "runs": runs}

    reference = curve()  # warm-up; its circuits are the ones the loop evaluates
    valid = full_circuit(model)
    counts = edge_counts(sizes, int(valid.sum()))
    random_circuits_of = random_circuits(valid, counts, args.n_random, 0)
    loop(reference)  # warm-up
    load_before = _load_average()
    sides: Dict[str, Dict[str, Any]] = {}
    cfg = model.cfg
    batch, n_pos = clean.shape
    per_row = forward_flops_per_row(cfg, n_pos) + hook_flops_per_row(model, n_pos)
    seconds, cpu_seconds, ours = best_time(curve, args.repeats, device)
    stats = fastpatch.last_run_stats()
    sides["fastpatch"] = {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "passes": stats["chunks"], "circuit_runs": stats["cells"],
        "rows": stats["cells"] * batch, "max_circuit_runs_per_pass": stats["max_cells_per_chunk"],
        "flops": stats["cells"] * batch * per_row, "other_forwards": len(ABLATIONS),  # one source run per ablation cache
    }
    seconds, cpu_seconds, looped = best_time(lambda: loop(ours), args.repeats, device)
    sides["loop"] = {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "passes": looped["runs"], "circuit_runs": looped["runs"],
        "rows": looped["runs"] * batch, "max_circuit_runs_per_pass": 1, "flops": looped["runs"] * batch * per_row,
        "other_forwards": len(ABLATIONS),
    }
    check = compare(torch.cat([looped["values"].flatten(), looped["random_values"].flatten()]),
                    torch.cat([ours.values.flatten(), ours.random_values.flatten()]), 1e-4,
                    1e-5 * float(looped["values"].abs().max()))
    ratio = sides["loop"]["seconds"] / sides["fastpatch"]["seconds"]
    return {
        "benchmark": "circuit_curves",
        **machine_record(args.device, device),
        "load_average": {"before": load_before, "after": _load_average()},
        "config": {
            "model": "fastpatch.models.load_induction_model (shipped, 2 layers, d_model 64, 4 heads)",
            "prompts": args.prompts, "positions": int(n_pos), "metric": "LogitDiff at the last position (batch mean)",
            "scores": "get_attr_patch_edges (EAP), not timed", "sizes": list(sizes), "ablations": ABLATIONS,
            "n_random": args.n_random, "edges": int(scores.valid.sum()),
            "loop": "MIB's procedure: per ablation the full, the empty and each size's top-n and random circuits, "
                    "one evaluate (one hooked forward) each, ablation caches computed once",
        },
        "fastpatch": sides["fastpatch"],
        "loop": sides["loop"],
        "ratio": ratio,
        "target_ratio": TARGET,
        "meets_target": ratio >= TARGET,
        "curve": {
            "edges_in_circuit": ours.n_edges.tolist(),
            "faithfulness": dict(zip(ours.ablations, ours.faithfulness.tolist())),
            "cpr": dict(zip(ours.ablations, ours.cpr.tolist())),
            "cmd": dict(zip(ours.ablations, ours.cmd.tolist())),
            "random_cpr": dict(zip(ours.ablations, ours.random_cpr.tolist())),
            "random_cmd": dict(zip(ours.ablations, ours.random_cmd.tolist())),
            "clean_metric": ours.clean.tolist(),
            "ablated_metric": dict(zip(ours.ablations, ours.ablated.tolist())),
        },
        **check,
        "command": command,
    }


def format_table(record: Dict[str, Any]) -> str:
    lines = [f"{'side':<10} {'seconds':>8} {'passes':>7} {'rows':>7} {'GFLOPs':>8}"]
    for side in ("loop", "fastpatch"):
        s = record[side]
        lines.append(f"{side:<10} {s['seconds']:>8.2f} {s['passes']:>7} {s['rows']:>7} {s['flops'] / 1e9:>8.2f}")
    lines.append(f"ratio {record['ratio']:.1f}x (target {record['target_ratio']:.0f}x), values agree: {record['agree']}")
    curve = record["curve"]
    for ablation in record["config"]["ablations"]:
        lines.append(
            f"{ablation:<10} CPR {curve['cpr'][ablation]:.3f} CMD {curve['cmd'][ablation]:.3f}  "
            f"(random: CPR {curve['random_cpr'][ablation]} CMD {curve['random_cmd'][ablation]})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = RESULTS_DIR / f"{args.device}-circuit-curves-induction{'-small' if args.small else ''}.json"
    command = "python bench/circuit_curves.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    record = run(args, command.strip())
    print(format_table(record))
    write_record(args.out, record)
    if not record["agree"]:
        raise SystemExit("the batched curve and the one-forward-per-circuit loop disagree")
    return record


if __name__ == "__main__":
    main()
