"""Smoke test of ``bench/activation_metric_costs.py`` on the small shape: it runs, writes its record, every
stock activation metric ran on the native backend (no fallback to hooks), and the ratios are the recorded
times' own quotients. No test asserts anything about time."""

from __future__ import annotations

import json

import pytest
import torch

from bench import activation_metric_costs

pytestmark = pytest.mark.slow  # a smoke run of a benchmark script: `.ci/run` runs it, `-m "not slow"` skips it


def test_activation_metric_costs_small(tmp_path) -> None:
    out = tmp_path / "record.json"
    threads = torch.get_num_threads()
    record = activation_metric_costs.main(["--small", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["threads"] == 1 and torch.get_num_threads() == threads  # run on one thread, the caller's restored
    assert [run["sweep"] for run in record["runs"]] == list(activation_metric_costs.SWEEPS)
    names = ("attention", "head_dla", "neuron", "final_resid")
    for run in record["runs"]:
        assert run["backend"]["logit_diff/hooks"] == "hooks"
        assert all(run["backend"][key] == "native" for key in ("logit_diff/auto", "logit_diff_declared/auto") + names), run
        seconds, cpu = run["seconds"], run["cpu_seconds"]
        for name in names:
            ratios = run["ratios"][name]
            assert ratios["vs_logit_auto"] == seconds[name] / seconds["logit_diff/auto"]
            assert ratios["vs_declared_auto"] == seconds[name] / seconds["logit_diff_declared/auto"]
            assert ratios["vs_logit_hooks"] == seconds[name] / seconds["logit_diff/hooks"]
            assert run["cpu_ratios"][name]["vs_logit_auto"] == cpu[name] / cpu["logit_diff/auto"]
