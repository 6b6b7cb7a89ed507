"""Smoke test of ``bench/launch_counts.py`` on the small shape: structural facts, no times.

The counts are deterministic, so the test asserts exact facts: positive, equal across runs, the
sampled TransformerLens estimate equal to the full count, fastpatch below TransformerLens's loop
for the head sweep, and the JSON's keys.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest
import torch

from bench import launch_counts as lc

HEAD = "get_act_patch_attn_head_out_all_pos"


@pytest.fixture(scope="module")
def small() -> Dict[str, Any]:
    return lc.setup(small=True, seed=0)


def test_counter_rules() -> None:
    """Views and allocations are not launches; a read-back is a sync; host-only tensors launch nothing."""
    x = torch.randn(3, 4)
    counter = lc.OpCounter()
    with counter.counting():
        y = x.t().reshape(12).unsqueeze(0)  # views, then one copy (reshape of a transposed tensor)
        float(y.sum())  # a launch and a device-to-host read
        idx = torch.arange(3)  # no device argument: a host tensor
        idx.tolist()
        (idx + 1).sum()
    assert counter.launches == {"aten.clone.default": 1, "aten.sum.default": 1, "aten._local_scalar_dense.default": 1}
    assert counter.syncs == {"aten._local_scalar_dense.default": 1}
    assert counter.host_ops == 3  # arange, add, sum on the host tensor
    assert counter.excluded["aten.t.default"] == 1 and counter.excluded["aten.unsqueeze.default"] == 1


@pytest.mark.slow  # builds a model and runs both libraries' sweeps: `-m "not slow"` skips it
def test_counts_deterministic_and_tl_estimate_exact(small: Dict[str, Any]) -> None:
    from transformer_lens import patching as tl

    from fastpatch import patching as fp

    metric = small["metrics"]["plain"]
    with torch.no_grad():
        ours = [lc.count_fastpatch(lc.sweep_calls(fp, HEAD, metric, small, {"progress": False})) for _ in range(2)]
        full = lc.count_tl(lc.sweep_calls(tl, HEAD, metric, small, None), small["model"], samples=None)
        sampled = lc.count_tl(lc.sweep_calls(tl, HEAD, metric, small, None), small["model"], samples=1)
    assert ours[0]["launches"] > 0 and full["launches"] > 0
    assert ours[0] == ours[1]
    assert full["method"] == "full" and sampled["method"] == "sampled" and sampled["stubbed_forwards"] > 0
    assert full["per_forward_constant"]
    for key in ("launches", "raw_ops", "host_syncs", "top_ops"):
        assert sampled[key] == full[key], key
    # One forward per cell in TransformerLens's loop: 2 layers x 4 heads.
    assert full["forwards"] == 8
    # Batched, fastpatch launches fewer kernels than the per-cell loop, even with its parity check.
    assert ours[0]["launches"] < full["launches"]


@pytest.mark.parametrize("sweep", [HEAD, "get_act_patch_resid_pre"])
def test_fastpatch_sweep_reads_back_a_few_times(small: Dict[str, Any], sweep: str) -> None:
    """A native sweep waits for the device a fixed number of times, whatever the number of layers
    or hooks: one read each for the parity check (every checked tensor's error at once), the
    token range, the clean activations' finiteness and the cells' first changed positions."""
    from fastpatch import patching as fp

    for metric in small["metrics"].values():
        with torch.no_grad():
            ours = lc.count_fastpatch(lc.sweep_calls(fp, sweep, metric, small, {"progress": False}))
        assert ours["host_syncs"] <= 4, ours["syncs_by_op"]


@pytest.mark.slow
def test_script_writes_json(tmp_path) -> None:
    out = tmp_path / "launch-counts.json"
    record = lc.main(["--small", "--sweeps", HEAD, "get_act_patch_direct_path_all_sources",
                      "--metrics", "logitdiff", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(record["results"]))
    assert saved["assumptions"]["h100_sxm_peak_flops"] == {"bf16_tensor_dense": 989.4e12, "fp32_non_tensor": 66.9e12}
    assert saved["assumptions"]["launch_overhead_us"] == 5.0
    assert [(r["sweep"], r["metric"]) for r in saved["results"]] == [
        (HEAD, "logitdiff"), ("get_act_patch_direct_path_all_sources", "logitdiff")]
    for row in saved["results"]:
        for lib in ("fastpatch", "transformer_lens"):
            part = row[lib]
            assert part["launches"] > 0 and part["raw_ops"] >= part["launches"]
            assert part["launch_floor_ms"] == pytest.approx(part["launches"] * 5e-3)
            for key in ("host_syncs", "top_ops", "launches_by_class", "flop_ms_h100_bf16_tensor_dense",
                        "flop_ms_h100_fp32_non_tensor", "dominates_h100_bf16_tensor_dense"):
                assert key in part
        assert "top_sources" in row["fastpatch"]
        assert row["transformer_lens"]["per_forward_constant"]
    head, direct = saved["results"]
    assert head["lower_bound_flops"] > 0 and head["fastpatch"]["dominates_h100_bf16_tensor_dense"] in ("launches", "flops")
    assert direct["lower_bound_flops"] is None and direct["fastpatch"]["dominates_h100_bf16_tensor_dense"] is None
    # TransformerLens reads each direct-path cell back with .item(): one sync per forward.
    assert direct["transformer_lens"]["host_syncs"] >= direct["transformer_lens"]["forwards"]
