"""pytest-benchmark timing of fastpatch edge attribution, plus smoke tests of the attribution scripts.

Small shape so that ``pytest bench`` (timing disabled by the project's config) takes seconds.
The benchmark checks its edge scores against TransformerLens's
``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))`` summed over positions; no
test asserts anything about time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from bench import attribution_quality as quality
from bench import compare_attribution as cli
from bench.models import logit_diff_metric
from fastpatch.attribution import get_attr_patch_edges

SMALL = cli.SHAPES["small"]
ROUNDS = 5
pytestmark = pytest.mark.slow  # smoke runs of the benchmarks: `.ci/run` runs them, `-m "not slow"` skips them


@pytest.fixture(scope="module")
def setup(small_model_and_pair) -> Dict[str, Any]:
    """Small model, prompts, a TransformerLens-compatible metric and TransformerLens's edges (once)."""
    model, pair = small_model_and_pair
    metric = logit_diff_metric(pair.answer[:1], pair.wrong[:1])  # fixed ids: TL calls it per prompt
    reference = attribution_patch(model, pair.clean, pair.corrupted, metric, EdgeAttributionConfig(granularity="edge"))
    return {"model": model, "clean": pair.clean, "corrupted": pair.corrupted, "metric": metric,
            "reference": reference.edge_scores}


def test_fastpatch_edges(benchmark, setup: Dict[str, Any]) -> None:
    """fastpatch edge attribution: three passes for the whole batch."""
    s = setup
    benchmark.extra_info.update(batch=SMALL["batch"], positions=SMALL["positions"], library="fastpatch")

    def sweep():
        return get_attr_patch_edges(s["model"], s["clean"], s["corrupted"], s["metric"])

    edges = benchmark.pedantic(sweep, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    theirs, seen = cli.tl_edges_on_our_grid(edges, s["reference"])
    assert torch.equal(seen, edges.valid)
    assert float(theirs.abs().max()) > 1e-3
    scale = float(theirs.abs().max())
    torch.testing.assert_close(edges.scores.double(), theirs, rtol=1e-4, atol=1e-5 * scale)


def test_cli_small_writes_result(tmp_path: Path) -> None:
    """``compare_attribution.py --small`` runs end to end and writes a complete JSON record."""
    out = tmp_path / "result.json"
    returned = cli.main(["--small", "--repeats", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record == json.loads(json.dumps(returned))
    for key in ("device", "device_name", "cpu_count", "versions", "git", "config", "results", "command"):
        assert key in record
    assert record["config"]["model"]["n_layers"] == SMALL["layers"] and record["config"]["batch"] == SMALL["batch"]
    [row] = record["results"]
    assert row["sweep"] == "get_attr_patch_edges"
    assert row["values_agree"] is True and row["edge_sets_equal"] is True and row["agree"] is True
    assert row["tl_seconds"] == min(row["tl_seconds_all"])
    assert row["fastpatch_seconds"] == min(row["fastpatch_seconds_all"])
    assert row["ratio"] == pytest.approx(row["tl_seconds"] / row["fastpatch_seconds"])
    assert row["cells"] == row["tl_edges"] // SMALL["positions"]  # one TL edge per position


def test_rank_statistics() -> None:
    """Average-tie ranks, Spearman, noise floor and top-k overlap of attribution_quality."""
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    assert quality.rankdata(x).tolist() == [5.0, 2.0, 3.5, 3.5, 1.0]
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g).round(decimals=1), torch.randn(50, generator=g).round(decimals=1)
    assert quality.rankdata(a).tolist() == scipy_stats.rankdata(a.numpy()).tolist()
    assert abs(quality.spearman(a, b) - scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic) < 1e-12
    assert quality.spearman(a, 2 * a + 1) == pytest.approx(1.0)
    exact = torch.tensor([[5.0, -4.0, 1e-9], [0.5, 3.0, 0.0]])
    est = torch.tensor([[4.0, -5.0, 0.0], [3.5, 0.2, 0.0]])
    m = quality.agreement(est, exact, floor=1e-6)
    assert m["cells"] == 6 and m["active_cells"] == 4  # 1e-9 is below the noise floor
    assert m["top3_overlap"] == 2 and not m["top3_equal"]
    assert m["top3"] == [[0, 1], [0, 0], [1, 0]]
