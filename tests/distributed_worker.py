"""Run under ``torchrun --nproc_per_node=2``: a sharded sweep must equal the single-process one.

Writes ``rank<r>.json`` into the folder given as the first argument (read by test_distributed.py).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import zoo  # noqa: E402

from fastpatch import patching as fp  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world": world, "checks": {}}
    for name in ("gpt2", "llama"):
        case = zoo.Case.build(name)
        with torch.no_grad():
            _, corrupted_cache = case.model.run_with_cache(case.corrupted)
        calls = {"n": 0}

        def counted(logits, metric=case.per_example):
            calls["n"] += 1
            return metric(logits)

        runs = {
            "head_by_pos_every_native": lambda d, m: fp.get_act_patch_attn_head_by_pos_every(
                case.model, case.corrupted, case.clean_cache, m, reduce="none", progress=False, backend="native", distributed=d
            ).values,
            "block_every_hooks": lambda d, m: fp.get_act_patch_block_every(
                case.model, case.corrupted, case.clean_cache, m, reduce="none", progress=False, backend="hooks", distributed=d
            ).values,
            "direct_path_q": lambda d, m: fp.get_act_patch_direct_path_all_sources(
                case.model, case.corrupted, case.clean_cache, corrupted_cache, lambda l: m(l).mean(), "q", verbose=False, distributed=d
            ),
        }
        for run_name, run in runs.items():
            calls["n"] = 0
            sharded = run(None, counted)
            sharded_calls = calls["n"]
            calls["n"] = 0
            single = run(False, counted)
            single_calls = calls["n"]
            scale = float(single.abs().max())
            report["checks"][f"{name}/{run_name}"] = {
                "max_abs_diff": float((sharded - single).abs().max()),
                "scale": scale,
                "spread": float(single.max() - single.min()),
                "sharded_metric_calls": sharded_calls,
                "single_metric_calls": single_calls,
            }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
