"""torchrun with 2 CPU ranks (gloo): every rank gets the single-process result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastpatch.engine.distributed as fd

WORKER = Path(__file__).parent / "distributed_worker.py"


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world"] == 2
        assert len(report["checks"]) == 6
        for name, check in report["checks"].items():
            assert check["spread"] > 1e-3, name  # the result is not trivially constant
            assert check["max_abs_diff"] <= 1e-5 * max(check["scale"], 1.0), (name, check)
            # the rank computed only its share of the cells (plus the baseline evaluation)
            assert check["sharded_metric_calls"] < 0.75 * check["single_metric_calls"], (name, check)


def test_shard_without_a_process_group():
    assert fd.shard(None) is None
    assert fd.shard(False) is None
    with pytest.raises(ValueError, match="init_process_group"):
        fd.shard(True)
    assert fd.my_cells(5, None) == [0, 1, 2, 3, 4]
    assert fd.my_cells(5, (1, 2)) == [1, 3]
