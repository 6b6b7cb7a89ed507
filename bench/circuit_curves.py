"""Time a faithfulness curve (``fastpatch.circuits.faithfulness_curve``) against a loop of one forward per circuit.

On the shipped induction model (``fastpatch.models.load_induction_model``, 2 layers), induction
prompt pairs and the last-position logit difference: edges scored by edge attribution
(``fastpatch.attribution.get_attr_patch_edges``, not timed), then MIB's ten circuit sizes under
three ablations (corrupted, zero, mean) with ``--n-random`` random baselines per size, plus the
empty and full circuits the normalisation needs: ``3 x (2 + 10 + 10 n_random)`` circuit runs.

- fastpatch: ``faithfulness_curve``: every circuit and ablation stacked along the batch dimension,
  chunked to the memory budget; identical circuits (MIB's smallest sizes round to 0 edges on a
  small model) run once, the full circuit (the clean run) once. Timed on the default backend
  (``"auto"``: the native one on this model; one pass per first changed position, positions before
  it, where clean and ablated runs agree, taken from the clean run) and on the hook backend (one
  hooked pass on the default budget);
- the loop: MIB's procedure (``evaluate_area_under_curve``), one forward per circuit: for each
  ablation the full and the empty circuit, then each size's top-n circuit and random circuit, each
  by ``evaluate(backend="hooks")`` of that one circuit (one hooked forward; the ablation caches
  computed once and passed in, so the loop runs no extra forward). The record checks that every
  side gives the same values.

Printed and recorded per side: forward passes, batch rows, and FLOPs (the dense matmul FLOPs of a
forward per row over the positions it computes times the rows, plus the reader inputs' masked
sums). Batching does not reduce FLOPs on the hook backend; the speed comes from fewer, larger
passes. The native backend computes no row for a cell that changes nothing (the full circuit) and
no position before a cell's first changed one. CPU figures are ratios.

Examples::

    python bench/circuit_curves.py --repeats 3     # -> bench/results/cpu-circuit-curves-induction.json
    python bench/circuit_curves.py --threads 1 --repeats 3 --out bench/results/cpu-circuit-curves-induction-1thread.json
    python bench/circuit_curves.py --device cuda --repeats 3   # -> bench/results/cuda-circuit-curves-induction.json
    python bench/circuit_curves.py --shared-prefix 16 --repeats 3  # IOI-like: pairs share 17 positions (BOS + 16)
    python bench/circuit_curves.py --small         # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import compare_transformer_lens as cli

ABLATIONS = ["corrupted", "zero", "mean"]
TARGET = 2.0  # issue 17: at least 2x a loop of one forward per circuit on CPU


def forward_flops_per_row(cfg: Any, n_pos: int, n_new: Optional[int] = None) -> int:
    """Dense matmul FLOPs of one forward of one row at its last ``n_new`` positions (default all ``n_pos``),
    attending over ``n_pos`` keys: Q/K/V/O projections, attention scores and mixing, MLP, unembedding."""
    d, heads, d_head = int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    kv = int(getattr(cfg, "n_key_value_heads", None) or heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    per_layer = 2 * d * d_head * (heads + 2 * kv) + 2 * heads * d_head * d + 2 * 2 * heads * d_head * n_pos + 2 * 2 * d * d_mlp
    return (n_pos if n_new is None else n_new) * (int(cfg.n_layers) * per_layer + 2 * d * int(cfg.d_vocab))


def hook_flops_per_row(model: Any, n_pos: int) -> int:
    """The reader inputs' masked sums per row, per position computed: each reader from the writers before it."""
    from fastpatch.circuits import full_circuit
    from fastpatch.engine.circuit_plan import CircuitPlan

    plan = CircuitPlan(model, torch.zeros(1, n_pos, dtype=torch.long), full_circuit(model)[None], [])
    return 2 * plan.hook_macs_per_position()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="induction prompt pairs")
    p.add_argument("--half-len", type=int, default=8, help="tokens of each half of an induction prompt")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="random tokens after BOS shared by each clean/corrupted pair (an IOI-like common prefix)")
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
    clean, corrupted, answer, wrong = induction_prompts(args.prompts, args.half_len, seed=0)
    if args.shared_prefix:  # the same context after BOS in both prompts of a pair: where they agree, before the halves
        context = torch.randint(1, int(model.cfg.d_vocab), (args.prompts, args.shared_prefix),
                                generator=torch.Generator().manual_seed(1))
        clean, corrupted = (torch.cat([t[:, :1], context, t[:, 1:]], dim=1) for t in (clean, corrupted))
    clean, corrupted, answer, wrong = (t.to(device) for t in (clean, corrupted, answer, wrong))
    metric = LogitDiff(answer, wrong)
    scores = get_attr_patch_edges(model, clean, corrupted, metric)
    sizes = MIB_SIZES[::3] if args.small else MIB_SIZES

    def curve(backend: str = "auto"):
        return faithfulness_curve(model, clean, corrupted, metric, scores, sizes=sizes, ablation=ABLATIONS,
                                  n_random=args.n_random, backend=backend)

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
                return float(evaluate(model, clean, None, metric, circuit[None], ablation=cache, backend="hooks")[0])

            one(valid), one(torch.zeros_like(valid))  # MIB's baseline (the full circuit) and empty-circuit scores
            for i in range(len(sizes)):
                values[a, i] = one(reference.circuits[i])
                for d in range(args.n_random):
                    random[a, d, i] = one(random_circuits_of[d, i])
        return {"values": values, "random_values": random, "runs": runs}

    reference = curve()  # warm-up; its circuits are the ones the loop evaluates
    curve("hooks")  # warm-up
    valid = full_circuit(model)
    counts = edge_counts(sizes, int(valid.sum()))
    random_circuits_of = random_circuits(valid, counts, args.n_random, 0)  # faithfulness_curve's (seed 0)
    loop(reference)  # warm-up
    cfg = model.cfg
    batch, n_pos = clean.shape
    # FLOPs per row and position computed (attending over every position), reader inputs' masked sums included
    per_position = forward_flops_per_row(cfg, n_pos, 1) + hook_flops_per_row(model, n_pos)
    load_before = cli._load_average()
    sides: Dict[str, Dict[str, Any]] = {}
    for side, backend in (("fastpatch", "auto"), ("fastpatch_hooks", "hooks")):
        seconds, cpu_seconds, result = cli.best_time(lambda backend=backend: curve(backend), args.repeats, device)
        stats = fastpatch.last_run_stats()
        native = stats["backend"] == "native"
        sides[side] = {
            "backend": stats["backend"], "seconds": seconds, "cpu_seconds": cpu_seconds, "passes": stats["chunks"],
            "circuit_runs": stats["cells"], "max_circuit_runs_per_pass": stats["max_cells_per_chunk"],
            # native: no row for a cell that changes nothing, no position before a cell's first changed one
            "rows": stats["computed_cells"] * batch, "no_op_circuit_runs": stats["no_op_cells"],
            "row_positions": stats["row_positions"], "flops": stats["row_positions"] * per_position,
            "other_forwards": len(ABLATIONS) + (2 if native else 0),  # ablation caches (+ the clean parity run, embedding)
            "values": result,
        }
    ours = sides["fastpatch"]["values"]
    seconds, cpu_seconds, looped = cli.best_time(lambda: loop(ours), args.repeats, device)
    sides["loop"] = {
        "backend": "hooks", "seconds": seconds, "cpu_seconds": cpu_seconds, "passes": looped["runs"],
        "circuit_runs": looped["runs"], "rows": looped["runs"] * batch, "max_circuit_runs_per_pass": 1,
        "row_positions": looped["runs"] * batch * n_pos, "flops": looped["runs"] * batch * n_pos * per_position,
        "other_forwards": len(ABLATIONS),
    }
    expected = torch.cat([looped["values"].flatten(), looped["random_values"].flatten()])
    checks = {}
    for side in ("fastpatch", "fastpatch_hooks"):
        got = sides[side].pop("values")
        checks[side] = cli.compare(expected, torch.cat([got.values.flatten(), got.random_values.flatten()]), 1e-4,
                               1e-5 * float(looped["values"].abs().max()))
    check = {**checks["fastpatch"], "agree": all(c["agree"] for c in checks.values()),
             "hooks_check": checks["fastpatch_hooks"]}
    ratio = sides["loop"]["seconds"] / sides["fastpatch"]["seconds"]
    return {
        "benchmark": "circuit_curves",
        **cli.machine_record(args.device, device),
        "load_average": {"before": load_before, "after": cli._load_average()},
        "config": {
            "model": "fastpatch.models.load_induction_model (shipped, 2 layers, d_model 64, 4 heads)",
            "prompts": args.prompts, "positions": int(n_pos), "metric": "LogitDiff at the last position (batch mean)",
            "shared_prefix": int((clean == corrupted).all(0).int().argmin()),  # positions every pair agrees on first
            "scores": "get_attr_patch_edges (EAP), not timed", "sizes": list(sizes), "ablations": ABLATIONS,
            "n_random": args.n_random, "edges": int(scores.valid.sum()),
            "loop": "MIB's procedure: per ablation the full, the empty and each size's top-n and random circuits, "
                    "one evaluate (one hooked forward) each, ablation caches computed once",
        },
        "fastpatch": sides["fastpatch"],
        "fastpatch_hooks": sides["fastpatch_hooks"],
        "loop": sides["loop"],
        "ratio": ratio,
        "ratio_hooks": sides["loop"]["seconds"] / sides["fastpatch_hooks"]["seconds"],
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
    lines = [f"{'side':<16} {'backend':<8} {'seconds':>8} {'passes':>7} {'rows':>7} {'GFLOPs':>8}"]
    for side in ("loop", "fastpatch_hooks", "fastpatch"):
        s = record[side]
        backend = s.get("backend", "hooks")
        lines.append(f"{side:<16} {backend:<8} {s['seconds']:>8.2f} {s['passes']:>7} {s['rows']:>7} {s['flops'] / 1e9:>8.2f}")
    lines.append(f"ratio {record['ratio']:.1f}x on the default backend ({record['fastpatch']['backend']}), "
                 f"{record['ratio_hooks']:.1f}x on hooks (target {record['target_ratio']:.0f}x), values agree: {record['agree']}")
    curve = record["curve"]
    for ablation in record["config"]["ablations"]:
        lines.append(
            f"{ablation:<10} CPR {curve['cpr'][ablation]:.3f} CMD {curve['cmd'][ablation]:.3f}  "
            f"(random: CPR {curve['random_cpr'][ablation]} CMD {curve['random_cmd'][ablation]})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.out is None:
        prefix = f"-prefix{args.shared_prefix}" if args.shared_prefix else ""
        args.out = cli.RESULTS_DIR / f"{args.device}-circuit-curves-induction{prefix}{'-small' if args.small else ''}.json"
    with cli.torch_threads(args.threads):
        record = run(args, cli.command_line("circuit_curves.py", argv))
    print(format_table(record))
    cli.write_record(args.out, record)
    if not record["agree"]:
        raise SystemExit("the batched curve and the one-forward-per-circuit loop disagree")
    return record


if __name__ == "__main__":
    main()
