"""Smoke test of ``bench/exact_edges.py``: the small shape end to end, values checked, record complete.

No test asserts anything about time (the ratios are the script's output, not a unit test's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import exact_edges as cli

pytestmark = pytest.mark.slow  # smoke runs of the benchmarks: `.ci/run` runs them, `-m "not slow"` skips them


def test_cli_small_writes_result(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    returned = cli.main(["--small", "--loop-sample", "12", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record == json.loads(json.dumps(returned))
    for key in ("device", "versions", "git", "config", "results", "command", "load_average"):
        assert key in record
    assert record["config"]["model"]["n_layers"] == cli.SHAPES["small"]["layers"]
    assert [row["metric"] for row in record["results"]] == ["plain", "logitdiff"]
    for row in record["results"]:
        assert row["agree"] is True and row["max_abs_value"] > 1e-3  # the sampled loop values vary
        assert 12 <= row["loop_edges_timed"] < row["edges"]
        assert row["ratio"] == pytest.approx(row["loop_seconds"] / row["fastpatch_seconds"])
        assert set(row["loop_seconds_per_edge"]) == {"q", "k", "v", "mlp_in", "logits"}
