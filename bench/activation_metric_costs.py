"""Cost of metrics on internal activations: the same sweep with an activation metric vs a logit metric.

Times, in one process and on one random-init GPT-2, each sweep with the logit-difference metric
(a plain callable, which gets the full logits, and the declared ``fastpatch.metrics.LogitDiff``,
which has the native backend unembed two columns at one position) and with activation metrics of
:mod:`fastpatch.metrics` (a head's attention, a head's direct logit attribution, a neuron, a read of
the final residual), and prints ``activation / logit`` time ratios against each logit metric on the
default backend (what a user sees when swapping the metric) and against the plain one on the hook
backend. The native backend records every hook these metrics read (the residual stream, patterns,
z, ``mlp.hook_post``, block outputs), inside patched layers too, and computes no logits for metrics
that declare ``reads_logits=False``; the backend each run used is recorded (``backend``). Each
round times every configuration once, interleaved, and the best of ``--repeats`` rounds is kept,
so a change in the machine's load hits every configuration alike. Values are checked against
TransformerLens in ``tests/test_activation_metrics.py``. Writes a JSON record under ``bench/results/``.

    python -m bench.activation_metric_costs            # GPT-2-small-shaped, 8 prompts x 15 tokens, CPU
    python -m bench.activation_metric_costs --small    # seconds
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import fastpatch  # noqa: E402
from bench import compare_transformer_lens as cli  # noqa: E402
from bench.models import logit_diff_metric, shaped_model, shaped_prompts  # noqa: E402
from fastpatch import patching as fp  # noqa: E402
from fastpatch.metrics import ActivationMetric, AttentionTo, HeadDLA, LogitDiff, NeuronValue  # noqa: E402

SWEEPS = ("get_act_patch_attn_head_out_all_pos", "get_act_patch_resid_pre")


def _metrics(model: Any, pair: Any, n_pos: int) -> Dict[str, Any]:
    last = model.cfg.n_layers - 1
    return {
        "logit_diff": logit_diff_metric(pair.answer, pair.wrong),
        "logit_diff_declared": LogitDiff(pair.answer, pair.wrong),
        "attention": AttentionTo(last, 0, n_pos - 1, 1),
        "head_dla": HeadDLA(model, last, 0, pair.answer, pair.wrong),
        "neuron": NeuronValue(last, 0),
        "final_resid": ActivationMetric(["ln_final.hook_in"], lambda logits, acts: acts["ln_final.hook_in"][:, -1].norm(dim=-1).mean(),
                                        reads_logits=False, positions=[-1]),
    }


def main(argv=None) -> Dict[str, Any]:
    big = cli.SHAPES["gpt2-small"]
    p = cli.new_parser(__doc__.split("\n\n")[0])
    cli.add_shape_arguments(p, big, batch_help="prompts per sweep")
    p.add_argument("--repeats", type=int, default=3, help="time each sweep N times and keep the best")
    p.add_argument("--out", type=Path, default=None, help="JSON record path (default under bench/results/)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the run (default: torch's own; restored after); 1 makes the CPU-second "
                        "ratios robust to other load on a shared machine")
    args = p.parse_args(argv)
    with cli.torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    cli.resolve_shape(args)
    device = torch.device(args.device)
    model = shaped_model(args, device, seed=0)
    pair = shaped_prompts(args, device, seed=0)
    clean, corrupted = pair.clean, pair.corrupted
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    metrics = _metrics(model, pair, args.positions)
    record: Dict[str, Any] = {
        "what": "activation metric / logit metric sweep time (fastpatch.metrics), one process",
        "shape": cli.shape_record(args),
        "corrupt_from": args.corrupt_from, "repeats": args.repeats, "device": cli.device_name(device),
        "threads": torch.get_num_threads(), "versions": cli.versions(), "git": cli.git_state(),
        "load_average_before": cli._load_average(), "runs": [],
    }
    names = ("attention", "head_dla", "neuron", "final_resid")
    for sweep in SWEEPS:
        fn = getattr(fp, sweep)
        configs = {"logit_diff/auto": ("logit_diff", "auto"), "logit_diff_declared/auto": ("logit_diff_declared", "auto"),
                   "logit_diff/hooks": ("logit_diff", "hooks"), **{name: (name, "auto") for name in names}}
        runs = {key: (lambda m=metrics[metric], b=backend: fn(model, corrupted, clean_cache, m, backend=b, progress=False))
                for key, (metric, backend) in configs.items()}
        backends: Dict[str, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback to hooks says why once per call
            for key, run in runs.items():
                run()  # warm-up (the native model build and parity check are per call, so they are timed too)
                backends[key] = fastpatch.last_run_stats()["backend"]
            # cpu_seconds: this process's CPU seconds in the best run
            seconds, cpu_seconds = cli.interleaved_best(runs, args.repeats, device)
        ratios = {
            name: {"vs_logit_hooks": seconds[name] / seconds["logit_diff/hooks"],
                   "vs_logit_auto": seconds[name] / seconds["logit_diff/auto"],
                   "vs_declared_auto": seconds[name] / seconds["logit_diff_declared/auto"]}
            for name in names
        }
        # CPU seconds well below wall * threads: the process was not getting its cores (another load)
        cpu_ratios = {name: {"vs_logit_auto": cpu_seconds[name] / cpu_seconds["logit_diff/auto"],
                             "vs_declared_auto": cpu_seconds[name] / cpu_seconds["logit_diff_declared/auto"]}
                      for name in names}
        record["runs"].append({"sweep": sweep, "seconds": seconds, "cpu_seconds": cpu_seconds, "backend": backends,
                               "ratios": ratios, "cpu_ratios": cpu_ratios})
        print(f"{cli.short_name(sweep):<16} logit diff: auto {seconds['logit_diff/auto']:.3f}s "
              f"({backends['logit_diff/auto']}), declared {seconds['logit_diff_declared/auto']:.3f}s, "
              f"hooks {seconds['logit_diff/hooks']:.3f}s")
        for name, r in ratios.items():
            print(f"    {name:<12} ({backends[name]}) {r['vs_logit_auto']:.2f}x logit diff, {r['vs_declared_auto']:.2f}x declared, "
                  f"{r['vs_logit_hooks']:.2f}x hooks")
    record["load_average_after"] = cli._load_average()
    cli.write_record(args.out or cli.dated_result_path(args, "activation-metric-costs"), record)
    return record


if __name__ == "__main__":
    main()
