"""Smoke test of ``bench/source_costs.py`` on the small shape: it runs, writes its record, and every
ablation's time is there beside the clean cache's, with its ratio to it. No test asserts anything about time."""

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
        # the ratios are the recorded times' own quotients (nothing about how long anything took)
        for kind, ratio in run["ratio_to_clean"].items():
            assert ratio == run["seconds"][kind] / run["seconds"]["clean"]
            assert run["cpu_ratio_to_clean"][kind] == run["cpu_seconds"][kind] / run["cpu_seconds"]["clean"]
