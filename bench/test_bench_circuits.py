"""pytest-benchmark timing of batched circuit evaluation, plus a smoke test of ``bench/circuit_curves.py``.

The shipped induction model and a few prompts, so that ``pytest bench`` takes seconds; the timed
call's values are checked against one ``evaluate`` per circuit; no test asserts anything about time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import circuit_curves
from fastpatch.circuits import evaluate, full_circuit
from fastpatch.metrics import LogitDiff
from fastpatch.models import induction_prompts, load_induction_model

pytestmark = pytest.mark.slow  # smoke runs of the benchmarks: `.ci/run` runs them, `-m "not slow"` skips them


def test_evaluate_many_circuits(benchmark) -> None:
    """Twelve circuits under three ablations in one batched call (the default backend: native here), equal to
    one hooked call per circuit."""
    import fastpatch

    model = load_induction_model()
    clean, corrupted, answer, wrong = induction_prompts(4, half_len=6)
    metric = LogitDiff(answer, wrong)
    full = full_circuit(model)
    g = torch.Generator().manual_seed(0)
    circuits = torch.stack([(torch.rand(full.shape, generator=g) < d) & full for d in torch.linspace(0.05, 0.95, 12)])
    ablations = ["corrupted", "zero", "mean"]
    benchmark.extra_info.update(circuits=len(circuits), ablations=len(ablations))
    values = benchmark.pedantic(lambda: evaluate(model, clean, corrupted, metric, circuits, ablation=ablations),
                                rounds=3, iterations=1, warmup_rounds=1)
    assert fastpatch.last_run_stats()["backend"] == "native"
    one_by_one = torch.tensor([[float(evaluate(model, clean, corrupted, metric, c[None], ablation=a, backend="hooks")[0])
                                for c in circuits] for a in ablations])
    assert float(one_by_one.max() - one_by_one.min()) > 1e-3
    torch.testing.assert_close(values, one_by_one, rtol=1e-5, atol=1e-5 * float(one_by_one.abs().max()))


def test_script_small_writes_result(tmp_path: Path) -> None:
    """``circuit_curves.py --small`` runs end to end and writes a complete JSON record."""
    out = tmp_path / "result.json"
    returned = circuit_curves.main(["--small", "--threads", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record == json.loads(json.dumps(returned))
    assert record["agree"] and record["hooks_check"]["agree"]
    assert record["fastpatch"]["backend"] == "native" and record["fastpatch_hooks"]["backend"] == "hooks"
    for side in ("fastpatch", "fastpatch_hooks"):
        assert record[side]["passes"] < record["loop"]["passes"]
        assert record[side]["flops"] == record[side]["row_positions"] * record["loop"]["flops"] // record["loop"]["row_positions"]
    # the native side computes no position before a cell's first changed one: fewer row-positions than hooks
    assert record["fastpatch"]["row_positions"] < record["fastpatch_hooks"]["row_positions"]
    assert set(record["curve"]["cpr"]) == set(circuit_curves.ABLATIONS)
