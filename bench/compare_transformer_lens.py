"""Time ``transformer_lens.patching`` against ``fastpatch.patching`` in one process.

Both libraries run the same sweeps on the same model, prompts, clean cache and metric, on the
same machine; the script checks that their values agree, prints TransformerLens seconds,
fastpatch seconds and their ratio, and writes a JSON result under ``bench/results/`` with the
device, library versions and git commit. CPU figures are ratios only; absolute times count on a GPU.

Examples::

    python bench/compare_transformer_lens.py                      # GPT-2 small shape, CPU
    python bench/compare_transformer_lens.py --small              # smoke test, seconds
    python bench/compare_transformer_lens.py --device cuda --sweeps all --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# TransformerLens draws a tqdm bar per sweep. tqdm (>= 4.66) reads TQDM_* defaults from the
# environment when it is first imported, so this must come before anything imports tqdm;
# if something already has (e.g. under pytest), _quiet_tqdm() redirects the bars instead.
_TQDM_PREIMPORTED = "tqdm" in sys.modules
os.environ.setdefault("TQDM_DISABLE", "1")

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402  (after the TQDM_DISABLE default and the script-mode sys.path entry)

from bench.models import ARCHITECTURES, logit_diff_metric, shaped_model, shaped_prompts  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

SWEEPS = (
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_resid_pre",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_block_every",
    "get_act_patch_direct_path_all_sources",
)
DEFAULT_SWEEPS = ("get_act_patch_attn_head_out_all_pos",)
METRICS = ("plain", "logitdiff")

SHAPES: Dict[str, Dict[str, int]] = {
    "gpt2-small": dict(layers=12, d_model=768, heads=12, vocab=50257, batch=8, positions=15),
    "small": dict(layers=2, d_model=64, heads=4, vocab=211, batch=4, positions=8),
}


def short_name(sweep: str) -> str:
    """``get_act_patch_attn_head_out_all_pos`` -> ``head-out-all-pos`` (for file names and tables)."""
    name = sweep.removeprefix("get_act_patch_").removeprefix("attn_")
    return name.replace("_", "-")


# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of Python and of every library the timing depends on (None when not installed)."""
    import fastpatch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformer_lens": _version("transformer-lens"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "fastpatch": fastpatch.__version__,
    }


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """A record's ``command``: ``python bench/<script>`` and ``argv`` (default: this process's own
    arguments), shell-quoted so that it can be pasted back."""
    return shlex.join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_record(path: Path, record: Dict[str, Any], indent: int = 2) -> None:
    """Write a benchmark record as JSON (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")
    print(f"wrote {path}")


def git_state() -> Dict[str, Any]:
    """``HEAD``'s commit and the tracked files with uncommitted changes (``dirty`` None if unknown)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    modified = [line[3:] for line in (status or "").splitlines() if line.strip()]
    commit = _git("rev-parse", "HEAD")
    return {"commit": commit and commit.strip(), "dirty": None if status is None else bool(modified),
            "modified": modified}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """Hide TransformerLens's progress bars when tqdm was imported before TQDM_DISABLE was set."""
    if not _TQDM_PREIMPORTED:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _load_average() -> Optional[List[float]]:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_record(device_arg: str, device: torch.device) -> Dict[str, Any]:
    """The fields every benchmark record starts with: where it ran (device, CPU count, torch
    threads) and with what (package versions, git state)."""
    return {
        "device": device_arg,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "git": git_state(),
    }


def best_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> Tuple[float, float, Any]:
    """``(best wall seconds, this process's CPU seconds in that run, last result)`` over ``repeats``.

    The device is synchronised around each run. CPU seconds well below ``wall * threads`` on a
    CPU run mean the process was not getting its cores (another load on the machine).
    """
    best, best_cpu, result = float("inf"), float("nan"), None
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        _sync(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, result


def interleaved_best(
    runs: Dict[str, Callable[[], Any]], repeats: int, device: torch.device,
    after: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``(best wall seconds, this process's CPU seconds in that run)`` of each of ``runs`` by key, over
    ``repeats`` interleaved rounds: each round runs every one once, so a change in the machine's load
    hits all alike. ``after(key)`` is called after each run (e.g. to read ``fastpatch.last_run_stats()``)."""
    seconds = {key: float("inf") for key in runs}
    cpu_seconds = {key: float("nan") for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            wall, cpu, _ = best_time(run, 1, device)
            if after is not None:
                after(key)
            if wall < seconds[key]:
                seconds[key], cpu_seconds[key] = wall, cpu
    return seconds, cpu_seconds


def dated_result_path(args: argparse.Namespace, what: str) -> Path:
    """``bench/results/<device>-<what>-<layers>L<d_model>d-<today>.json``: a dated record of a shape."""
    return RESULTS_DIR / f"{args.device}-{what}-{args.layers}L{args.d_model}d-{time.strftime('%Y%m%d')}.json"


def shape_record(args: argparse.Namespace) -> Dict[str, int]:
    """The shape options of :func:`add_shape_arguments` as a record's ``shape`` field."""
    return {k: getattr(args, k) for k in ("layers", "d_model", "heads", "vocab", "batch", "positions")}


def model_record(args: argparse.Namespace, arch: str = "gpt2") -> Dict[str, Any]:
    """A record's ``config["model"]``: the random-init architecture (``bench.models.ARCHITECTURES``) at
    the shape and seed of the options (:func:`add_shape_arguments`, ``--seed``)."""
    return {"architecture": ARCHITECTURES[arch][1], "n_layers": args.layers, "d_model": args.d_model,
            "n_heads": args.heads, "d_vocab": args.vocab, "seed": args.seed}


def as_tensor(result: Any) -> torch.Tensor:
    """The values of a sweep's return (a tensor, ``(tensor, index_df)`` or a ``PatchingResult``)."""
    if isinstance(result, tuple):
        result = result[0]
    return result if isinstance(result, torch.Tensor) else result.values


def compare(tl: torch.Tensor, ours: torch.Tensor, rtol: float, atol: float) -> Dict[str, Any]:
    """Max abs / relative difference and whether ``|ours - tl| <= atol + rtol * |tl|`` everywhere."""
    tl, ours = tl.detach().float().cpu(), ours.detach().float().cpu()
    if tl.shape != ours.shape:
        return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "agree": False,
                "shape_mismatch": [list(tl.shape), list(ours.shape)]}
    diff = (ours - tl).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / tl.abs().clamp_min(1e-12)).max()),
        "max_abs_value": float(tl.abs().max()),
        "agree": bool(torch.allclose(ours, tl, rtol=rtol, atol=atol)),
    }


# ----------------------------------------------------------------------------- main


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except ``None`` and ``False`` ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def add_shape_arguments(p: argparse.ArgumentParser, shape: dict, batch_help: str) -> None:
    """The model-shape, prompt, ``--small`` and ``--device`` options every comparison script takes."""
    p.add_argument("--layers", type=int, default=shape["layers"], help="n_layers")
    p.add_argument("--d-model", type=int, default=shape["d_model"], help="d_model")
    p.add_argument("--heads", type=int, default=shape["heads"], help="n_heads (must divide d_model)")
    p.add_argument("--vocab", type=int, default=shape["vocab"], help="vocabulary size")
    p.add_argument("--batch", type=int, default=shape["batch"], help=batch_help)
    p.add_argument("--positions", type=int, default=shape["positions"], help="tokens per prompt")
    p.add_argument("--corrupt-from", type=int, default=None,
                   help="first position where clean and corrupted prompts differ "
                        "(default: 10, or positions // 2 for prompts of 10 tokens or fewer)")
    p.add_argument("--small", action="store_true",
                   help="smoke-test shape: 2 layers, d_model 64, 4 heads, vocab 211, 4 prompts x 8 "
                        "tokens (overrides the shape options)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both libraries run")


def resolve_shape(args: argparse.Namespace, middle: bool = False) -> None:
    """Apply ``--small`` (``SHAPES["small"]``) and the default ``--corrupt-from`` to the options of
    :func:`add_shape_arguments`, and refuse ``--device cuda`` where torch sees no CUDA device.

    The default corrupted position is 10 (where IOI's second subject stands), or the middle of
    prompts of 10 tokens or fewer; ``middle``: always the middle.
    """
    if args.small:
        for key, value in SHAPES["small"].items():
            setattr(args, key, value)
    if args.corrupt_from is None:
        args.corrupt_from = 10 if args.positions > 10 and not middle else args.positions // 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: torch's own choice), the caller's
    count restored after, even when the block raises (e.g. the smoke tests run ``main`` in-process)."""
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def new_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark script's parser: ``description`` and help showing the defaults (:class:`_HelpFormatter`)."""
    return argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)


def format_rows(header: str, lines: Sequence[str]) -> str:
    """A plain-text table: ``header``, a rule as wide, then ``lines``."""
    return "\n".join([header, "-" * len(header), *lines])


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` documents every option."""
    big = SHAPES["gpt2-small"]
    p = new_parser(
        "Time transformer_lens.patching against fastpatch.patching on one random-init GPT-2 "
        "(GPT-2 small's shape by default), check that the values agree, print a table and "
        "write a JSON result under bench/results/."
    )
    p.add_argument("--sweeps", nargs="+", default=list(DEFAULT_SWEEPS), metavar="FN",
                   help=f"sweep functions to time ('all' for every one); choices: {', '.join(SWEEPS)}")
    add_shape_arguments(p, big, batch_help="prompts per sweep")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="gpt2",
                   help="model family (random init, the shape from --layers/--d-model/--heads/--vocab)")
    p.add_argument("--repeats", type=int, default=1, help="time each library N times and keep the best")
    p.add_argument("--fastpatch-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra keyword arguments for every fastpatch call, e.g. \'{"chunk_size": 16}\'')
    p.add_argument("--grad", action="store_true",
                   help="run both libraries with autograd enabled (TransformerLens's loop then builds "
                        "a graph per forward); by default both run under torch.no_grad(), the "
                        "conservative comparison")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS),
                   help="'plain': a plain callable (full logits); 'logitdiff': fastpatch.metrics.LogitDiff, "
                        "which declares the two logits it reads (both compute the same numbers)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the value check")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the value check")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both libraries (default: torch's own); 1 makes the CPU-second "
                        "ratio robust to other load on a shared machine")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result path (default: bench/results/<device>-<sweep set>[-small].json, e.g. "
                        "cpu-head-out-all-pos.json; the set is 'all' when every sweep runs)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--small``, expand ``--sweeps all`` and validate the sweep names."""
    resolve_shape(args)
    if args.sweeps == ["all"]:
        args.sweeps = list(SWEEPS)
    unknown = [s for s in args.sweeps if s not in SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {list(SWEEPS)} or 'all'")
    if not isinstance(args.fastpatch_kwargs, dict):
        raise SystemExit("--fastpatch-kwargs must be a JSON object")
    if args.out is None:
        sweep_set = "+".join(short_name(s) for s in args.sweeps)
        if set(args.sweeps) == set(SWEEPS):
            sweep_set = "all"
        arch = "" if args.arch == "gpt2" else f"-{args.arch}"
        args.out = RESULTS_DIR / f"{args.device}{arch}-{sweep_set}{'-small' if args.small else ''}.json"
    return args


def _time_sweep(tl, fp, sweep, metric_name, metric, model, corrupted, clean_cache, fp_kwargs, args, device):
    """Time one sweep with one metric in both libraries; values, ratio, lower-bound FLOPs."""
    from bench.flops import sweep_lower_bound_flops

    tl_fn, fp_fn = getattr(tl, sweep), getattr(fp, sweep)
    direct_path = "direct_path" in sweep
    if direct_path:  # (model, tokens, clean cache, corrupted cache, metric), q paths
        _, corrupted_cache = model.run_with_cache(corrupted)
        tl_call = partial(tl_fn, model, corrupted, clean_cache, corrupted_cache, metric, "q", verbose=False)
        kwargs = {k: v for k, v in fp_kwargs.items() if k != "progress"}
        fp_call = partial(fp_fn, model, corrupted, clean_cache, corrupted_cache, metric, "q", verbose=False, **kwargs)
    else:
        tl_call = partial(tl_fn, model, corrupted, clean_cache, metric)
        fp_call = partial(fp_fn, model, corrupted, clean_cache, metric, **fp_kwargs)
    with _quiet_tqdm():
        tl_s, tl_cpu, tl_out = best_time(tl_call, args.repeats, device)
    with warnings.catch_warnings(record=True) as caught:  # e.g. a fallback to the hook backend
        warnings.simplefilter("always")
        fp_s, fp_cpu, fp_out = best_time(fp_call, args.repeats, device)
    for w in caught:
        print(f"fastpatch warning ({sweep}): {w.message}", file=sys.stderr)
    tl_values = as_tensor(tl_out)
    flops = None if direct_path else sweep_lower_bound_flops(fp_fn, model, corrupted, clean_cache, metric)
    return {
        "sweep": sweep,
        "metric": metric_name,
        "cells": int(tl_values.numel()),
        "tl_seconds": tl_s,
        "fastpatch_seconds": fp_s,
        "ratio": tl_s / fp_s,
        "tl_cpu_seconds": tl_cpu,
        "fastpatch_cpu_seconds": fp_cpu,
        "cpu_ratio": tl_cpu / fp_cpu,  # this process's CPU seconds: less sensitive to other load than wall time
        "lower_bound_flops": flops,
        "fastpatch_gflops_per_s": None if flops is None else flops / fp_s / 1e9,
        **compare(tl_values, as_tensor(fp_out), args.rtol, args.atol),
        "fastpatch_warnings": sorted({str(w.message) for w in caught}),
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the model and inputs, time every sweep in both libraries, return the result record."""
    from transformer_lens import patching as tl

    from fastpatch import patching as fp

    device = torch.device(args.device)
    model = shaped_model(args, device, build=ARCHITECTURES[args.arch][0])
    clean, corrupted, answer, wrong = shaped_prompts(args, device)
    from fastpatch.metrics import LogitDiff

    metric = logit_diff_metric(answer, wrong)
    metric_objects = {"plain": metric, "logitdiff": LogitDiff(answer, wrong)}
    fp_kwargs = {"progress": False, **args.fastpatch_kwargs}

    grad = torch.enable_grad() if args.grad else torch.no_grad()
    with grad:
        _, clean_cache = model.run_with_cache(clean)
        clean_metric = float(metric(model(clean)))
        corrupted_metric = float(metric(model(corrupted)))

        # Warm both code paths up with one single-cell sweep (allocator, kernels, hook machinery).
        one_cell = tl.make_df_from_ranges([1, 1], ["layer", "pos"])
        warm = dict(patch_setter=tl.layer_pos_patch_setter, activation_name="resid_pre", index_df=one_cell)
        with _quiet_tqdm():
            tl.generic_activation_patch(model, corrupted, clean_cache, metric, **warm)
        fp.generic_activation_patch(model, corrupted, clean_cache, metric, **warm, **fp_kwargs)
        _sync(device)

        load_before = _load_average()
        rows = []
        for sweep in args.sweeps:
            for metric_name in args.metrics:
                rows.append(_time_sweep(tl, fp, sweep, metric_name, metric_objects[metric_name], model,
                                        corrupted, clean_cache, fp_kwargs, args, device))

    return {
        "benchmark": "compare_transformer_lens",
        **machine_record(args.device, device),
        "load_average": {"before": load_before, "after": _load_average()},
        "config": {
            "model": model_record(args, args.arch),
            "batch": args.batch,
            "positions": args.positions,
            "corrupt_from": args.corrupt_from,
            "sweeps": list(args.sweeps),
            "metric": "mean last-position logit difference (answer - wrong): 'plain' callable and/or "
                      "fastpatch.metrics.LogitDiff (declares the logits it reads)",
            "metrics": list(args.metrics),
            "repeats": args.repeats,
            "grad_enabled": bool(args.grad),
            "fastpatch_kwargs": fp_kwargs,
            "fastpatch_backend": fp_kwargs.get("backend", "default"),
            "rtol": args.rtol,
            "atol": args.atol,
            "small": bool(args.small),
        },
        "clean_metric": clean_metric,
        "corrupted_metric": corrupted_metric,
        "results": rows,
    }


def format_table(record: Dict[str, Any]) -> str:
    """A plain-text table of one result record."""
    header = (f"{'sweep':<26}{'metric':>10}{'cells':>7}{'TL s':>10}{'fastpatch s':>13}{'ratio':>9}"
              f"{'LB GFLOP':>10}{'GFLOP/s':>9}{'max |diff|':>12}  agree")
    lines = []
    for r in record["results"]:
        lines.append(
            f"{short_name(r['sweep']):<26}{r['metric']:>10}{r['cells']:>7}{r['tl_seconds']:>10.2f}"
            f"{r['fastpatch_seconds']:>13.3f}{r['ratio']:>8.2f}x"
            + (f"{'-':>10}{'-':>9}" if r["lower_bound_flops"] is None else
               f"{r['lower_bound_flops'] / 1e9:>10.1f}{r['fastpatch_gflops_per_s']:>9.1f}")
            + f"{r['max_abs_diff']:>12.2e}"
            f"  {'yes' if r['agree'] else 'NO'}"
        )
    return format_rows(header, lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, run the comparison, print the table, write the JSON; returns the record."""
    args = _resolve(build_parser().parse_args(argv))
    cfg = f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}"
    print(f"device {args.device} ({device_name(torch.device(args.device))}); model: {cfg}; "
          f"{args.batch} prompts x {args.positions} tokens; best of {args.repeats}", flush=True)
    with torch_threads(args.threads):
        record = run(args)
    print(format_table(record))
    print(f"values agree within rtol={args.rtol:g}, atol={args.atol:g}: "
          f"{all(r['agree'] for r in record['results'])}")
    write_record(args.out, record)
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(0 if all(r["agree"] for r in record["results"]) else 1)
