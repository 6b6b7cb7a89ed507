"""GPU readiness without a GPU: every kernel variant the launchers pick compiles for sm_80 and
sm_90, fits one block's shared memory, spills nothing and, in half precision, uses tensor cores.

The full record, ``bench/results/kernel-resources.json`` (every variant of the four benchmark
shapes), must match what the launchers plan now, and every variant in it must be viable. A sample
(an LN/multi-head shape and an RMS/grouped-query shape: every op, dtype, mode and K/V component) is
recompiled here by ``bench/kernel_resources.py`` in a child process (ahead-of-time compilation
needs Triton's real JIT, which ``TRITON_INTERPRET=1`` in this process replaces) and must reproduce
the committed resources exactly: the record is what the compiler makes, not a copy. The tests skip,
with the reason, only where Triton or its bundled ptxas / cuobjdump / nvdisasm are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import kernel_resources as kr  # noqa: E402

ARCHS = (80, 90)
COMMITTED = REPO / "bench" / "results" / "kernel-resources.json"

pytestmark = pytest.mark.skipif(kr.tools_missing(in_this_process=False) is not None,
                                reason=f"cannot compile Triton kernels here: {kr.tools_missing(in_this_process=False)}")


SAMPLE_MODELS = ("gpt2-small", "llama-3-8b")  # LN + multi-head, RMS + grouped-query K/V
# What the sample must reproduce exactly from the committed record.
RESOURCES = ("registers", "stack_bytes", "local_bytes", "shared_bytes", "spill_loads", "spill_stores",
             "tensor_core_instructions", "instructions")


@pytest.fixture(scope="session")
def record(tmp_path_factory):
    """The sample, compiled now."""
    out = tmp_path_factory.mktemp("kernels") / "kernel-resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "bench" / "kernel_resources.py"), "--quiet", "--no-roofline",
           "--archs", *map(str, ARCHS), "--models", *SAMPLE_MODELS, "--json", str(out)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def committed():
    return json.loads(COMMITTED.read_text())


@pytest.fixture(scope="session")
def variants(record, committed):
    """The sample compiled now and every committed variant: the checks below hold for both."""
    return record["variants"] + committed["variants"]


def _failures(variants, check):
    return [f"{v['name']}: {problem}" for v in variants for problem in check(v)]


def test_sample_covers_every_op_dtype_mode_and_component(record):
    names = {v["name"] for v in record["variants"]}
    assert names == {v.name for v in kr.variants(ARCHS, SAMPLE_MODELS)}
    ops = {v["op"] for v in record["variants"]}
    assert ops == {"delta_projection", "qkv_edge_scores"}
    assert {v["dtype"] for v in record["variants"]} == {"fp32", "bf16", "fp16"}
    assert {v["mode"] for v in record["variants"] if v["op"] == "delta_projection"} == {"exact", "linear"}
    assert {v["component"] for v in record["variants"] if v["op"] == "delta_projection"} == {"q", "k"}


def test_sample_reproduces_the_committed_resources(record, committed):
    """Recompiled now, the sample's registers, spills, shared memory and instruction counts equal
    the committed record's (same Triton and ptxas: the compiler is deterministic)."""
    made_with = committed["environment"]["triton"]
    import triton

    if triton.__version__ != made_with:
        pytest.skip(f"{COMMITTED.name} was made with Triton {made_with}, this is {triton.__version__}: "
                    "rerun bench/kernel_resources.py to compare")
    by_name = {v["name"]: v for v in committed["variants"]}
    for v in record["variants"]:
        c = by_name[v["name"]]
        assert c["binary"] == v["binary"], v["name"]
        assert {k: c[k] for k in RESOURCES} == {k: v[k] for k in RESOURCES}, v["name"]


def test_every_variant_compiles(variants):
    assert not _failures(variants, lambda v: [] if v["compiled"] else [v.get("error", "no error text")])


def test_every_variant_fits_shared_memory(variants):
    limit = {f"sm_{a}": shared for a, shared in kr.SHARED_PER_BLOCK.items()}
    assert not _failures(variants, lambda v: [f"{v['shared_bytes']} B > {limit[v['arch']]} B"]
                         if v["shared_bytes"] > limit[v["arch"]] else [])
    assert all(v["shared_bytes"] > 0 for v in variants)  # the dots stage operands in shared memory


def test_no_variant_spills(variants):
    def spills(v):
        found = {k: v[k] for k in ("spill_loads", "spill_stores", "stack_bytes", "local_bytes") if v[k]}
        return [f"{found} at {v['registers']} registers"] if found else []

    assert not _failures(variants, spills)
    assert all(0 < v["registers"] <= kr.MAX_REGISTERS for v in variants)


def test_half_precision_dots_use_tensor_cores(variants):
    half = [v for v in variants if v["dtype"] != "fp32" and v["use_dot"]]
    assert half, "no half-precision dot variant was compiled"
    assert not _failures(variants, lambda v: [] if v["dtype"] == "fp32" or not v["use_dot"]
                         or v["tensor_core_instructions"] else ["no HMMA/HGMMA instruction"])
    # and fp32 dots stay IEEE fp32 (no TF32 tensor-core rounding unless a caller asks for it)
    assert not _failures(variants, lambda v: ["tensor-core instructions in an fp32 variant"]
                         if v["dtype"] == "fp32" and v["tensor_core_instructions"] else [])


def test_every_variant_viable(variants):
    assert not _failures(variants, lambda v: v["problems"])


def test_committed_record_matches_the_launchers(committed):
    """``bench/results/kernel-resources.json`` holds every variant the launchers plan now (all four
    benchmark shapes, every recorded architecture), with the launch configurations in the code, and
    every one of them is viable."""
    archs = [int(a.removeprefix("sm_")) for a in committed["archs"]]
    assert set(ARCHS) <= set(archs)
    recorded = {v["name"]: v for v in committed["variants"]}
    planned = {v.name: v for v in kr.variants(archs)}
    assert set(recorded) == set(planned), "rerun bench/kernel_resources.py"
    for name, variant in planned.items():
        launch, _ = kr.plan(variant)
        c = recorded[name]
        now = {"blocks": {k: val for k, val in launch.constexprs.items() if k.startswith("BLOCK_")},
               "num_warps": launch.num_warps, "num_stages": launch.num_stages, "grid": list(launch.grid)}
        for key, value in now.items():
            assert c[key] == value, f"{name} {key}: committed {c[key]}, launcher now {value}"
    bad = [f"{v['name']}: {v['problems']}" for v in committed["variants"] if not v["viable"] or v["problems"]]
    assert not bad


def test_op_counter_counts_an_unfused_op_sequence():
    """The reference's roofline counts each op's reads and writes (views launch nothing)."""
    a = torch.empty(6, 10, device="meta")
    b = torch.empty(10, 7, device="meta")

    def reference():
        c = a @ b  # reads 60 + 70, writes 42 floats, 2 * 6 * 10 * 7 FLOPs
        return (c.t() * 2.0).sum()  # a view, then mul (reads 42, writes 42) and sum (reads 42, writes 1)

    cost = kr.reference_cost(reference)
    assert cost["flops"] == 2 * 6 * 10 * 7
    assert cost["launches"] == 3
    assert cost["bytes"] == 4 * ((60 + 70 + 42) + (42 + 42) + (42 + 1))


def test_fused_cost_formulas_on_a_small_launch():
    """The kernels' cost functions against a count done by hand for one small launch."""
    from csrc_triton.delta_projection import plan_delta_projection

    S, L, B, P, D, N = 2, 3, 2, 5, 32, 48
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    launch = plan_delta_projection(meta(S, B, P, D), meta(L, B, P, D), meta(L, D), None, meta(L, D, N),
                                   meta(S, L, B, P, N), mode="exact", norm="RMS", eps=1e-5, arch=90)
    from csrc_triton.delta_projection import delta_projection_cost

    cost = delta_projection_cost(launch)
    M, tiles_n = B * P, -(-N // launch.constexprs["BLOCK_N"])
    assert cost["flops"] == 2 * S * L * M * D * N + 8 * S * L * M * D * tiles_n
    assert cost["bytes"] == 4 * ((S + L) * M * D + L * (D * N + 2 * D) + S * L * M * N)
