"""pytest-benchmark timings of the head-out all-positions sweep, TransformerLens vs fastpatch.

Small shape so that ``pytest bench --benchmark-disable`` takes seconds. Every benchmark also
checks its values against TransformerLens's; no test asserts anything about time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from transformer_lens import patching as tl

from bench import compare_transformer_lens as cli
from bench.models import logit_diff_metric
from fastpatch import patching as fp

SMALL = cli.SHAPES["small"]
ROUNDS = 5
pytestmark = pytest.mark.slow  # smoke runs of the benchmarks: `.ci/run` runs them, `-m "not slow"` skips them


@pytest.fixture(scope="module")
def setup(small_model_and_pair) -> Dict[str, Any]:
    """Small model, prompts, clean cache, metric, and TransformerLens's reference values (once)."""
    model, pair = small_model_and_pair
    metric = logit_diff_metric(pair.answer, pair.wrong)
    with torch.no_grad():
        _, cache = model.run_with_cache(pair.clean)
        reference = tl.get_act_patch_attn_head_out_all_pos(model, pair.corrupted, cache, metric)
    return {
        "model": model, "corrupted": pair.corrupted, "cache": cache, "metric": metric, "reference": reference,
    }


def _cells(setup: Dict[str, Any]) -> int:
    return int(setup["reference"].numel())


def test_reference_is_not_trivial(setup: Dict[str, Any]) -> None:
    """The comparison proves something only if patch effects differ across heads."""
    reference = setup["reference"]
    assert reference.shape == (SMALL["layers"], SMALL["heads"])
    assert reference.abs().max() > 1e-3 and reference.std() > 1e-4


def test_tl_head_out_all_pos(benchmark, setup: Dict[str, Any]) -> None:
    """TransformerLens's loop: one forward per (layer, head)."""
    s = setup
    benchmark.extra_info.update(cells=_cells(s), forwards=_cells(s), library="transformer_lens")

    def sweep() -> torch.Tensor:
        with torch.no_grad():
            return tl.get_act_patch_attn_head_out_all_pos(s["model"], s["corrupted"], s["cache"], s["metric"])

    values = benchmark.pedantic(sweep, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(values, s["reference"], rtol=1e-4, atol=1e-5)


def test_fastpatch_head_out_all_pos(benchmark, setup: Dict[str, Any]) -> None:
    """fastpatch: the same sweep, cells stacked along the batch."""
    s = setup
    benchmark.extra_info.update(cells=_cells(s), library="fastpatch")

    def sweep() -> torch.Tensor:
        with torch.no_grad():
            return fp.get_act_patch_attn_head_out_all_pos(
                s["model"], s["corrupted"], s["cache"], s["metric"], progress=False
            )

    values = benchmark.pedantic(sweep, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(values, s["reference"], rtol=1e-4, atol=1e-5)


def test_cli_small_writes_result(tmp_path: Path) -> None:
    """``compare_transformer_lens.py --small`` runs end to end and writes a complete JSON record."""
    out = tmp_path / "result.json"
    returned = cli.main(["--small", "--sweeps", "all", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record == json.loads(json.dumps(returned))
    for key in ("device", "device_name", "versions", "git", "config", "results"):
        assert key in record
    for key in ("torch", "transformer_lens", "triton"):
        assert key in record["versions"]
    assert "commit" in record["git"]
    assert record["config"]["model"]["n_layers"] == SMALL["layers"]
    assert record["config"]["sweeps"] == list(cli.SWEEPS)
    assert [(r["sweep"], r["metric"]) for r in record["results"]] == [(s, m) for s in cli.SWEEPS for m in cli.METRICS]
    for row in record["results"]:
        assert row["lower_bound_flops"] is None if "direct_path" in row["sweep"] else row["lower_bound_flops"] > 0
        for key in ("tl_seconds", "fastpatch_seconds", "ratio", "max_abs_diff", "agree"):
            assert key in row
        assert row["agree"] is True, row
        assert row["ratio"] == pytest.approx(row["tl_seconds"] / row["fastpatch_seconds"])


def test_cli_threads_sets_torch_threads_for_the_run_only(tmp_path: Path) -> None:
    """``--threads 1`` runs both libraries on one torch thread (recorded), records the CPU-second ratio,
    and leaves the caller's thread count as it was."""
    before = torch.get_num_threads()
    out = tmp_path / "result.json"
    record = cli.main(["--small", "--sweeps", "get_act_patch_resid_pre", "--metrics", "logitdiff", "--threads", "1",
                       "--out", str(out)])
    assert torch.get_num_threads() == before
    assert record["torch_threads"] == 1
    (row,) = record["results"]
    assert row["agree"] is True
    assert row["cpu_ratio"] == pytest.approx(row["tl_cpu_seconds"] / row["fastpatch_cpu_seconds"])
