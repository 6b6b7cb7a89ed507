"""Smoke test of ``bench/source_costs.py`` on the small shape: it runs, writes its record, and every
ablation's time and work are there beside the clean cache's, with their ratios to it. No test asserts
anything about time."""

from __future__ import annotations

import json

import pytest

from bench import source_costs

pytestmark = pytest.mark.slow  # a smoke run of a benchmark script: `.ci/run` runs it, `-m "not slow"` skips it


def test_source_costs_small(tmp_path) -> None:
    out = tmp_path / "record.json"
    record = source_costs.main(["--small", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert len(record["runs"]) == 2 * len(source_costs.SWEEPS)
    for run in record["runs"]:
        assert set(run["seconds"]) == {"clean", "zero", "mean", "resample"}
        assert set(run["ratio_to_clean"]) == {"zero", "mean", "resample"}
        # the ratios are the recorded times' and work's own quotients (nothing about how long anything took)
        work = run["work"]
        for kind, ratio in run["ratio_to_clean"].items():
            assert ratio == run["seconds"][kind] / run["seconds"]["clean"]
            assert run["cpu_ratio_to_clean"][kind] == run["cpu_seconds"][kind] / run["cpu_seconds"]["clean"]
            blocks = work[kind]["row_position_blocks"] / work["clean"]["row_position_blocks"]
            assert run["work_ratio_to_clean"][kind] == blocks
            assert run["ratio_per_work"][kind] == pytest.approx(ratio / blocks, rel=1e-12)
        for kind, w in work.items():
            assert w["backend"] == "native" and w["no_op_cells"] + w["computed_cells"] == work["clean"]["no_op_cells"] + \
                work["clean"]["computed_cells"]
            assert 0 < w["row_positions"] <= w["row_position_blocks"]
        if run["shared_prefix"] > 1:
            # IOI-like pairs: the clean cache skips the shared prefix, which no ablation's sweep can
            assert all(w["row_position_blocks"] > work["clean"]["row_position_blocks"]
                       for kind, w in work.items() if kind != "clean"), work
