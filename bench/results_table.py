"""Regenerate the performance tables of README.md and bench/README.md from bench/results/*.json.

One row per timed comparison with TransformerLens: the records of ``compare_transformer_lens.py``
(activation patching sweeps) and ``compare_attribution.py`` (edge attribution, sweep
``attr_patch_edges``), named by their ``benchmark`` field. Other records (rank correlations, cost
ratios within fastpatch, kernel resources) are not TransformerLens comparisons and are skipped.

    python bench/results_table.py           # print the table
    python bench/results_table.py --write   # replace the table between the markers in both READMEs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
TIMED = ("compare_transformer_lens", "compare_attribution")  # records with TL-vs-fastpatch timings


def table() -> str:
    """One markdown row per (result file, sweep, metric)."""
    lines = [
        "| device | model | sweep | metric | backend | TransformerLens s | fastpatch s | ratio | lower-bound GFLOP | GFLOP/s | values agree | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("benchmark") not in TIMED:
            continue
        cfg = record["config"]
        model = cfg["model"]
        family = model["architecture"].split(" ")[0].removesuffix("LMHeadModel").removesuffix("ForCausalLM")
        shape = f"{family} {model['n_layers']}L d{model['d_model']} {model['n_heads']}H V{model['d_vocab']}, {cfg['batch']}x{cfg['positions']} tok"
        threads = record.get("torch_threads")
        if threads is not None and record.get("cpu_count") is not None and threads != record["cpu_count"]:
            shape += f", {threads} thread{'s' if threads != 1 else ''}"  # only where not the default
        for r in record["results"]:
            flops = r.get("lower_bound_flops")
            gflop = "" if flops is None else f"{flops / 1e9:.0f}"
            rate = "" if flops is None else f"{r['fastpatch_gflops_per_s']:.0f}"
            lines.append(
                f"| {record['device_name']} | {shape} "
                f"| {r['sweep'].replace('get_act_patch_', '').replace('get_attr_patch_', 'attr_patch_')} | {r.get('metric', 'plain')} "
                f"| {cfg.get('fastpatch_backend', 'default')} | {r['tl_seconds']:.2f} | {r['fastpatch_seconds']:.2f} "
                f"| **{r['ratio']:.2f}x** | {gflop} | {rate} | {'yes' if r['agree'] else 'NO'} | `{path.name}` |"
            )
    return "\n".join(lines)


def write(text: str) -> None:
    for readme in (ROOT / "README.md", ROOT / "bench" / "README.md"):
        content = readme.read_text()
        if START not in content:
            continue
        head, rest = content.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update the READMEs in place")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        write(text)
