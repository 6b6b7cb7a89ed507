"""Cost of ablation sources: the same sweep with a zero / mean / resample cache vs a clean cache.

Times, in one process and on one random-init GPT-2, each sweep patched from a clean run's cache
and from each ablation cache of :mod:`fastpatch.sources`, and prints ``ablation / clean`` time
ratios. Two prompt shapes: IOI-like pairs (identical before ``--corrupt-from``: a clean cache
changes nothing before it, so the native backend starts every cell there) and pairs that differ
from position 1 (no shared prefix to skip). An ablation changes every position, so on IOI-like
pairs it does more work than the clean patch it is compared with; on prompts without a shared
prefix both do the same work. Writes a JSON record under ``bench/results/``.

    python -m bench.source_costs            # GPT-2-small-shaped, 8 prompts x 15 tokens, CPU
    python -m bench.source_costs --small    # seconds
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from bench import compare_transformer_lens as cli  # noqa: E402
from bench.models import gpt2_small_shaped, ioi_like_tokens, logit_diff_metric  # noqa: E402
from fastpatch import patching as fp  # noqa: E402
from fastpatch.sources import mean_ablation, resample_ablation, zero_ablation  # noqa: E402

SWEEPS = ("get_act_patch_attn_head_out_all_pos", "get_act_patch_resid_pre")
RESULTS = Path(__file__).parent / "results"


def _sources(model: Any, clean: torch.Tensor, corrupted: torch.Tensor) -> Dict[str, Any]:
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return {
        "clean": clean_cache,
        "zero": zero_ablation(model, clean),
        "mean": mean_ablation(model, clean),
        "resample": resample_ablation(model, clean, seed=0),
    }


def main(argv=None) -> Dict[str, Any]:
    big = cli.SHAPES["gpt2-small"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli._HelpFormatter)
    cli.add_shape_arguments(p, big, batch_help="prompts per sweep")
    p.add_argument("--repeats", type=int, default=3, help="time each sweep N times and keep the best")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "hooks"))
    p.add_argument("--out", type=Path, default=None, help="JSON record path (default under bench/results/)")
    args = p.parse_args(argv)
    if args.small:
        for key, value in cli.SHAPES["small"].items():
            setattr(args, key, value)
    if args.corrupt_from is None:
        args.corrupt_from = 10 if args.positions > 10 else args.positions // 2
    device = torch.device(args.device)
    model = gpt2_small_shaped(0, args.layers, args.d_model, args.heads, args.vocab).to(device)
    record: Dict[str, Any] = {
        "what": "ablation source / clean cache sweep time (fastpatch.sources), one process",
        "shape": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "vocab", "batch", "positions")},
        "backend": args.backend, "repeats": args.repeats, "device": cli.device_name(device),
        "threads": torch.get_num_threads(), "versions": cli.versions(), "git": cli.git_state(),
        "load_average_before": cli._load_average(), "runs": [],
    }
    for prefix in (args.corrupt_from, 1):
        pair = ioi_like_tokens(args.vocab, args.batch, args.positions, corrupt_from=max(prefix, 4), seed=0)
        clean, corrupted = pair.clean.to(device), pair.corrupted.to(device)
        if prefix == 1:  # no shared prefix: redraw every position after BOS
            corrupted[:, 1:] = (clean[:, 1:] % (args.vocab - 1)) + 1
        metric = logit_diff_metric(pair.answer, pair.wrong)
        sources = _sources(model, clean, corrupted)
        for sweep in SWEEPS:
            fn = getattr(fp, sweep)
            runs = {kind: partial(fn, model, corrupted, cache, metric, backend=args.backend, progress=False)
                    for kind, cache in sources.items()}
            for run in runs.values():
                run()  # warm-up (native model build and parity check are per call, so they are timed too)
            # interleaved: every repeat times each source once, so a change of machine load hits all alike
            times = {kind: float("inf") for kind in runs}
            cpu = dict(times)
            for _ in range(args.repeats):
                for kind, run in runs.items():
                    wall, seconds, _ = cli.best_time(run, 1, device)
                    if wall < times[kind]:
                        times[kind], cpu[kind] = wall, seconds
            ratios = {k: times[k] / times["clean"] for k in times if k != "clean"}
            cpu_ratios = {k: cpu[k] / cpu["clean"] for k in cpu if k != "clean"}
            record["runs"].append({"sweep": sweep, "shared_prefix": prefix, "seconds": times, "cpu_seconds": cpu,
                                   "ratio_to_clean": ratios, "cpu_ratio_to_clean": cpu_ratios})
            print(f"{cli.short_name(sweep):<16} shared prefix {prefix:>2}: clean {times['clean']:.3f}s  "
                  + "  ".join(f"{k} {v:.2f}x (cpu {cpu_ratios[k]:.2f}x)" for k, v in ratios.items()))
    record["load_average_after"] = cli._load_average()
    name = f"{args.device}-source-costs-{args.layers}L{args.d_model}d-{time.strftime('%Y%m%d')}.json"
    cli.write_record(args.out or RESULTS / name, record)
    return record


if __name__ == "__main__":
    main()
