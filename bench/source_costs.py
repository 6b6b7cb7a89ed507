"""Cost of ablation sources: the same sweep with a zero / mean / resample cache vs a clean cache.

Times, in one process and on one random-init GPT-2, each sweep patched from a clean run's cache
and from each ablation cache of :mod:`fastpatch.sources`, and prints ``ablation / clean`` time
ratios beside the work each run did. Two prompt shapes:

- pairs that differ from position 1 (only the BOS shared): a clean cache and an ablation do about
  the same work, so their time ratio is the cost of the source itself (the issue's 1.2x target);
- IOI-like pairs (identical before ``--corrupt-from``): a clean cache changes nothing before that
  position, so the native backend skips every cell there (a no-op) and starts the others at it,
  which an ablation, changing (almost) every position, cannot: the time ratio there is mostly a
  ratio of work, not a cost of the source.

Each run records the work of every source's sweep from ``fastpatch.last_run_stats()``: cells
computed and skipped as no-ops, prompt rows x positions recomputed and that times the blocks from
each cell's entry (``row_position_blocks``), and ``ratio_per_work``, the time ratio divided by the
``row_position_blocks`` ratio (time per unit of work against the clean cache's). Writes a JSON
record under ``bench/results/``.

    python -m bench.source_costs            # GPT-2-small-shaped, 8 prompts x 15 tokens, CPU
    python -m bench.source_costs --small    # seconds
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from bench import compare_transformer_lens as cli  # noqa: E402
from bench.models import logit_diff_metric, shaped_model, shaped_prompts  # noqa: E402
from fastpatch import last_run_stats  # noqa: E402
from fastpatch import patching as fp  # noqa: E402
from fastpatch.sources import mean_ablation, resample_ablation, zero_ablation  # noqa: E402

SWEEPS = ("get_act_patch_attn_head_out_all_pos", "get_act_patch_resid_pre")
WORK = ("no_op_cells", "computed_cells", "row_positions", "row_position_blocks")
READING = (
    "ratio_to_clean is wall time against the same sweep patched from a clean cache. Without a shared prefix "
    "(shared_prefix 1: only BOS) both do about the same work, so it is the cost of the source. On IOI-like pairs "
    "a clean cache makes every cell before the first differing position a no-op and starts the others there, "
    "which an ablation (changing almost every position) cannot, so compare ratio_per_work: time per "
    "row_position_blocks (prompt rows x positions x blocks recomputed, from fastpatch.last_run_stats()) "
    "against the clean cache's."
)


def _sources(model: Any, clean: torch.Tensor) -> Dict[str, Any]:
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return {
        "clean": clean_cache,
        "zero": zero_ablation(model, clean),
        "mean": mean_ablation(model, clean),
        "resample": resample_ablation(model, clean, seed=0),
    }


def _work() -> Dict[str, Any]:
    """The work of the sweep that just ran: backend, cells computed and skipped, rows x positions (x blocks)."""
    stats = last_run_stats()
    return {"backend": stats["backend"], **{key: stats[key] for key in WORK}}


def _per_work(seconds: float, work: Dict[str, Any], clean_seconds: float, clean_work: Dict[str, Any]) -> Any:
    """Time per unit of work (row_position_blocks) against the clean cache's; None where a run did no work."""
    if not work["row_position_blocks"] or not clean_work["row_position_blocks"]:
        return None
    return (seconds / work["row_position_blocks"]) / (clean_seconds / clean_work["row_position_blocks"])


def main(argv=None) -> Dict[str, Any]:
    big = cli.SHAPES["gpt2-small"]
    p = cli.new_parser(__doc__.split("\n\n")[0])
    cli.add_shape_arguments(p, big, batch_help="prompts per sweep")
    p.add_argument("--repeats", type=int, default=3, help="time each sweep N times and keep the best")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "hooks"))
    p.add_argument("--out", type=Path, default=None, help="JSON record path (default under bench/results/)")
    args = p.parse_args(argv)
    cli.resolve_shape(args)
    device = torch.device(args.device)
    model = shaped_model(args, device, seed=0)
    record: Dict[str, Any] = {
        "what": "ablation source / clean cache sweep time (fastpatch.sources), one process, with each run's work",
        "reading": READING,
        "shape": cli.shape_record(args),
        "corrupt_from": args.corrupt_from, "backend": args.backend, "repeats": args.repeats,
        **cli.machine_record(args.device, device),
        "load_average_before": cli._load_average(), "runs": [],
    }
    for prefix in (args.corrupt_from, 1):
        pair = shaped_prompts(args, device, seed=0, corrupt_from=max(prefix, 4))
        clean, corrupted = pair.clean, pair.corrupted
        if prefix == 1:  # no shared prefix: redraw every position after BOS
            corrupted[:, 1:] = (clean[:, 1:] % (args.vocab - 1)) + 1
        metric = logit_diff_metric(pair.answer, pair.wrong)
        sources = _sources(model, clean)
        for sweep in SWEEPS:
            fn = getattr(fp, sweep)
            runs = {kind: partial(fn, model, corrupted, cache, metric, backend=args.backend, progress=False)
                    for kind, cache in sources.items()}
            for run in runs.values():
                run()  # warm-up (native model build and parity check are per call, so they are timed too)
            work: Dict[str, Dict[str, Any]] = {}  # the same every repeat: the cells and their first changed positions
            times, cpu = cli.interleaved_best(runs, args.repeats, device, after=lambda kind: work.update({kind: _work()}))
            ablations = [k for k in times if k != "clean"]
            ratios = {k: times[k] / times["clean"] for k in ablations}
            cpu_ratios = {k: cpu[k] / cpu["clean"] for k in ablations}
            work_ratios = {k: work[k]["row_position_blocks"] / work["clean"]["row_position_blocks"]
                           if work["clean"]["row_position_blocks"] else None for k in ablations}
            per_work = {k: _per_work(times[k], work[k], times["clean"], work["clean"]) for k in ablations}
            record["runs"].append({
                "sweep": sweep, "shared_prefix": prefix, "seconds": times, "cpu_seconds": cpu, "work": work,
                "ratio_to_clean": ratios, "cpu_ratio_to_clean": cpu_ratios, "work_ratio_to_clean": work_ratios,
                "ratio_per_work": per_work,
            })
            base = work["clean"]
            print(f"{cli.short_name(sweep):<16} shared prefix {prefix:>2} ({base['backend']}): clean {times['clean']:.3f}s, "
                  f"{base['computed_cells']} cells computed, {base['no_op_cells']} no-ops, "
                  f"{base['row_positions']} rows x positions")
            for k in ablations:
                w = work[k]
                print(f"{'':<20}{k:<9} {ratios[k]:.2f}x time (cpu {cpu_ratios[k]:.2f}x), {w['computed_cells']} cells, "
                      f"{w['no_op_cells']} no-ops, {w['row_positions']} rows x positions, "
                      f"work (rows x positions x blocks) {_fmt(work_ratios[k])}, time per work {_fmt(per_work[k])}")
    record["load_average_after"] = cli._load_average()
    cli.write_record(args.out or cli.dated_result_path(args, "source-costs"), record)
    return record


def _fmt(ratio: Any) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


if __name__ == "__main__":
    main()
