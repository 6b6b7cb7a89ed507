"""Compile every Triton kernel variant the launchers pick, for sm_80/sm_90 (sm_100), with no GPU.

The interpreter (``TRITON_INTERPRET=1``) checks a kernel's values; it says nothing of what the GPU
compiler makes of it. This script asks each launcher's own planning function
(``csrc_triton.<op>.plan_<op>``, the code path that picks blocks, warps and stages on a GPU) which
launch it would make for representative model shapes, with tensors on the ``meta`` device and the
target architecture named, specialises the arguments exactly as Triton's JIT does at launch time,
compiles ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(the ptxas bundled with Triton assembles the cubin), and reads back from the cubin:

- registers, stack and local memory (``cuobjdump --dump-resource-usage``);
- spill instructions (``LDL`` / ``STL`` in ``nvdisasm``), tensor-core instructions (``HMMA``,
  ``HGMMA``, ``UTCHMMA``...);
- shared memory (Triton's dynamic allocation plus the static one) against the architecture's limit
  per block (sm_80 163 KB, sm_90 and sm_100 227 KB).

A variant is *viable* when it compiles, fits shared memory, uses at most 255 registers a thread
with no spill instruction and no stack, and (half precision, every dot block >= 16) issues
tensor-core instructions. Per launch the JSON also holds a static roofline: FLOPs and DRAM bytes
(``csrc_triton.<op>.<op>_cost``, formulas in the kernels' docstrings) against published A100 and
H100 peaks, the predicted time and bound, and the same for the unfused PyTorch reference
(``fastpatch.ops.<op>``'s reference, its FLOPs, bytes and kernel launches counted op by op on meta
tensors). These are predictions that a GPU run must confirm.

    python bench/kernel_resources.py                     # -> bench/results/kernel-resources.json
    python bench/kernel_resources.py --archs 80 90 --json /tmp/k.json --quiet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `bench`, `csrc_triton` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The JIT's default (FP fusion on), said explicitly so that Triton 3.9 does not warn per compile.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch

from bench.compare_transformer_lens import write_record
from bench.gpu_costs import LAUNCH_SECONDS, PEAKS, launches_kernel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "kernel-resources.json"

# Shared memory one block may use (opt-in maximum), bytes: CUDA C Programming Guide, table
# "Technical Specifications per Compute Capability".
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
MAX_REGISTERS = 255
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "UTCHMMA", "UTCQMMA", "UTCMMA", "QGMMA")

# Representative models: (layers, d_model, heads, kv heads, d_head, norm, batch, positions).
MODELS = {
    "gpt2-small": dict(layers=12, d_model=768, heads=12, kv_heads=12, d_head=64, norm="LN", batch=8, pos=15),
    "pythia-1.4b": dict(layers=24, d_model=2048, heads=16, kv_heads=16, d_head=128, norm="LN", batch=8, pos=128),
    "llama-2-7b": dict(layers=32, d_model=4096, heads=32, kv_heads=32, d_head=128, norm="RMS", batch=8, pos=128),
    "llama-3-8b": dict(layers=32, d_model=4096, heads=32, kv_heads=8, d_head=128, norm="RMS", batch=8, pos=128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One launch to compile: which op, for which model shape, dtype, options and architecture."""

    op: str  # "delta_projection" or "qkv_edge_scores"
    model: str
    dtype: str
    arch: int
    mode: str = ""  # delta_projection: "exact" / "linear"
    component: str = ""  # delta_projection: "q" or "k" (K/V of grouped-query models are narrower)

    @property
    def name(self) -> str:
        parts = [self.op, self.model, self.dtype, self.mode, self.component, f"sm_{self.arch}"]
        return "/".join(p for p in parts if p)


def variants(archs: Sequence[int], models: Sequence[str] = tuple(MODELS), dtypes: Sequence[str] = tuple(DTYPES)) -> List[Variant]:
    """Every launch the two launchers make for the representative shapes."""
    out = []
    for arch in archs:
        for model in models:
            kv = MODELS[model]["kv_heads"] != MODELS[model]["heads"]
            for dtype in dtypes:
                for mode in ("exact", "linear"):
                    for component in ("q", "k") if kv else ("q",):
                        out.append(Variant("delta_projection", model, dtype, arch, mode, component))
                out.append(Variant("qkv_edge_scores", model, dtype, arch))
    return out


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def plan(variant: Variant):
    """``(launch, reference_call)``: the launcher's own plan for ``variant`` on meta tensors, and a
    thunk running the op's plain-PyTorch reference on the same meta tensors."""
    m = MODELS[variant.model]
    dtype = DTYPES[variant.dtype]
    L, D, dh, rows = m["layers"], m["d_model"], m["d_head"], m["batch"] * m["pos"]
    if variant.op == "delta_projection":
        from csrc_triton.delta_projection import plan_delta_projection
        from fastpatch.ops.delta_projection import delta_projection_reference

        # One source at a time, as engine/direct_path.py calls it: the first source layer reaches
        # every later layer.
        n_out = (m["heads"] if variant.component == "q" else m["kv_heads"]) * dh
        delta = _meta(1, m["batch"], m["pos"], D, dtype=dtype)
        resid = _meta(L - 1, m["batch"], m["pos"], D, dtype=dtype)
        w = _meta(L - 1, D, dtype=dtype)
        b = _meta(L - 1, D, dtype=dtype) if m["norm"] == "LN" else None
        W = _meta(L - 1, D, n_out, dtype=dtype)
        out = _meta(1, L - 1, m["batch"], m["pos"], n_out, dtype=dtype)
        kw = dict(mode=variant.mode, norm=m["norm"], eps=1e-5)
        launch = plan_delta_projection(delta, resid, w, b, W, out, arch=variant.arch, **kw)
        return launch, lambda: delta_projection_reference(delta, resid, w, b, W, **kw)
    if variant.op == "qkv_edge_scores":
        from csrc_triton.edge_scores import plan_qkv_edge_scores
        from fastpatch.ops.edge_scores import qkv_edge_scores_reference

        # Every writer (embedding, heads, MLPs) into every Q/K/V reader, as attribution/edges.py calls it.
        H = m["heads"]
        writers = _meta(1 + L * H + L, rows, D, dtype=dtype)
        grads = _meta(L, 3 * H, rows, dh, dtype=dtype)
        W = _meta(L, 3 * H, D, dh, dtype=dtype)
        x = _meta(L, rows, D, dtype=dtype)
        gamma = _meta(L, D, dtype=dtype)
        out = _meta(writers.shape[0], L, 3 * H, dtype=torch.float32)
        kw = dict(norm=m["norm"], eps=1e-5)
        launch = plan_qkv_edge_scores(writers, grads, W, x, gamma, out, arch=variant.arch, **kw)
        return launch, lambda: qkv_edge_scores_reference(writers, grads, W, x, gamma, **kw)
    raise ValueError(f"unknown op {variant.op!r}")


# ----------------------------------------------------------------------------- compilation


def _specialise(launch) -> Tuple[Any, Dict[str, str], Dict, Dict, Dict]:
    """``(target, signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` builds
    them for these arguments (divisibility by 16, strides equal to 1 made constant, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", launch.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    meta = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return target, signature, constexprs, attrs, options.__dict__


def compile_key(launch) -> str:
    """Launches with equal keys compile to the same binary."""
    target, signature, constexprs, attrs, options = _specialise(launch)
    # options name libraries by absolute path (libdevice inside Triton's install): keep the file name only,
    # so the key is the same wherever this Triton is installed (a venv, another user's site-packages)
    import triton

    installed_at = str(Path(triton.__file__).parent)
    text = repr((launch.kernel.__name__, target, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted((k, repr(v).replace(installed_at, "<triton>")) for k, v in options.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def tools_missing(in_this_process: bool = True) -> Optional[str]:
    """Why this machine (and, with ``in_this_process``, this process) cannot compile and inspect
    kernels, or None."""
    if in_this_process and os.environ.get("TRITON_INTERPRET") == "1":
        # Ahead-of-time compilation needs real JIT functions, not the interpreter's stand-ins.
        return "TRITON_INTERPRET=1 is set (compile in a process without it)"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        if not _tool(name).exists():
            return f"Triton's bundled {name} is missing ({_tool(name)})"
    return None


def supported_archs() -> List[int]:
    """sm_80 and sm_90, and sm_100 where the bundled toolchain assembles it."""
    archs = [80, 90]
    if _tool("ptxas-blackwell").exists() or _ptxas_knows("sm_100a"):
        archs.append(100)
    return archs


def _ptxas_knows(arch: str) -> bool:
    try:
        out = subprocess.run([str(_tool("ptxas")), "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return arch in out


def read_cubin(cubin: bytes) -> Dict[str, Any]:
    """Registers, stack, local memory, static shared memory and instruction counts of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(_tool("nvdisasm")), "-c", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, flags=re.M)
    count = lambda names: sum(1 for op in opcodes if op in names)  # noqa: E731
    return {
        "registers": int(fields.get("REG", 0)),
        "stack_bytes": int(fields.get("STACK", 0)),
        "local_bytes": int(fields.get("LOCAL", 0)),
        "static_shared_bytes": int(fields.get("SHARED", 0)),
        "spill_loads": count(("LDL",)),
        "spill_stores": count(("STL",)),
        "tensor_core_instructions": count(TENSOR_CORE_OPS),
        "instructions": len(opcodes),
    }


def compile_variant(variant: Variant) -> Dict[str, Any]:
    """Plan ``variant``, compile it for its architecture and read its resources back."""
    import triton
    from triton.compiler import ASTSource

    launch, _ = plan(variant)
    target, signature, constexprs, attrs, options = _specialise(launch)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options)
    except Exception as error:  # a variant that does not compile is a finding, not a crash
        return {"compiled": False, "error": f"{type(error).__name__}: {str(error)[:500]}"}
    seconds = time.perf_counter() - t0
    result = {"compiled": True, "compile_seconds": round(seconds, 2),
              "dynamic_shared_bytes": int(compiled.metadata.shared), **read_cubin(compiled.asm["cubin"])}
    result["shared_bytes"] = result["dynamic_shared_bytes"] + result["static_shared_bytes"]
    return result


# ----------------------------------------------------------------------------- roofline


def _peak_key(dtype: torch.dtype, tensor_cores: bool) -> str:
    if dtype == torch.float32:
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype] if tensor_cores else "fp32"


def _predict(flops: float, bytes_moved: float, peak: Dict[str, float], key: str) -> Dict[str, Any]:
    compute, memory = flops / peak[key], bytes_moved / peak["hbm"]
    return {"seconds": max(compute, memory), "bound": "compute" if compute >= memory else "memory",
            "compute_seconds": compute, "memory_seconds": memory}


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read and written, FLOPs and kernel launches of every op, the unfused model: each op
    reads its tensor inputs from DRAM and writes its outputs there. Ops that launch no kernel
    (views, metadata, allocation: ``bench.gpu_costs.launches_kernel``) move nothing."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import FlopCounterMode

        self.flop_counter = FlopCounterMode(display=False)
        self.bytes = 0
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if launches_kernel(func):
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            self.launches += 1
        return out


def reference_cost(reference: Callable[[], Any]) -> Dict[str, float]:
    """FLOPs, DRAM bytes and launches of the unfused PyTorch reference, counted op by op."""
    counter = _OpCounter()
    with counter.flop_counter, counter:
        reference()
    return {"flops": float(counter.flop_counter.get_total_flops()), "bytes": float(counter.bytes),
            "launches": counter.launches}


def roofline(variant: Variant, launch, reference: Callable[[], Any]) -> Dict[str, Any]:
    """Predicted time of the fused launch and of the unfused reference on A100 and H100."""
    from csrc_triton.delta_projection import delta_projection_cost
    from csrc_triton.edge_scores import qkv_edge_scores_cost

    cost_fn = {"delta_projection": delta_projection_cost, "qkv_edge_scores": qkv_edge_scores_cost}[variant.op]
    dtype = DTYPES[variant.dtype]
    fused = cost_fn(launch)
    ref = reference_cost(reference)
    tensor_cores = launch.constexprs.get("USE_DOT", False)
    out: Dict[str, Any] = {"fused_flops": fused["flops"], "fused_bytes": fused["bytes"],
                           "reference_flops": ref["flops"], "reference_bytes": ref["bytes"],
                           "reference_launches": ref["launches"]}
    for gpu, peak in PEAKS.items():
        f = _predict(fused["flops"], fused["bytes"], peak, _peak_key(dtype, tensor_cores))
        r = _predict(ref["flops"], ref["bytes"], peak, "fp32")  # the reference computes in fp32
        r["seconds_with_launches"] = r["seconds"] + ref["launches"] * LAUNCH_SECONDS
        out[gpu] = {"fused": f, "reference": r, "speedup": r["seconds_with_launches"] / f["seconds"]}
    return out


# ----------------------------------------------------------------------------- driver


def viability(v: Dict[str, Any], arch: int, half: bool, use_dot: bool) -> List[str]:
    """Why a compiled variant is not viable (empty when it is)."""
    if not v.get("compiled"):
        return ["does not compile"]
    problems = []
    if v["shared_bytes"] > SHARED_PER_BLOCK[arch]:
        problems.append(f"shared memory {v['shared_bytes']} B > {SHARED_PER_BLOCK[arch]} B")
    if v["spill_loads"] or v["spill_stores"] or v["local_bytes"] or v["stack_bytes"]:
        problems.append(f"spills ({v['spill_stores']} STL, {v['spill_loads']} LDL, stack {v['stack_bytes']} B)")
    if v["registers"] > MAX_REGISTERS:
        problems.append(f"{v['registers']} registers")
    if half and use_dot and not v["tensor_core_instructions"]:
        problems.append("no tensor-core instructions in a half-precision dot")
    return problems


def measure(archs: Sequence[int], models: Sequence[str] = tuple(MODELS), dtypes: Sequence[str] = tuple(DTYPES),
            workers: int = 2, with_roofline: bool = True) -> Dict[str, Any]:
    """Compile every variant (each distinct binary once) and collect resources and predictions."""
    todo = variants(archs, models, dtypes)
    planned = {v: plan(v) for v in todo}
    keys = {v: compile_key(planned[v][0]) for v in todo}
    first: Dict[str, Variant] = {}
    for v in todo:
        first.setdefault(keys[v], v)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        compiled = dict(zip(first, pool.map(compile_variant, first.values())))
    wall = time.perf_counter() - t0
    rows = []
    for v in todo:
        launch, reference = planned[v]
        c = compiled[keys[v]]
        half = DTYPES[v.dtype] != torch.float32
        use_dot = bool(launch.constexprs.get("USE_DOT"))
        row = {
            "name": v.name, "op": v.op, "kernel": launch.kernel.__name__, "model": v.model, "dtype": v.dtype,
            "mode": v.mode or None, "component": v.component or None, "arch": f"sm_{v.arch}",
            "blocks": {k: val for k, val in launch.constexprs.items() if k.startswith("BLOCK_")},
            "num_warps": launch.num_warps, "num_stages": launch.num_stages, "grid": list(launch.grid),
            "programs": int(torch.tensor(launch.grid).prod()), "use_dot": use_dot, "binary": keys[v],
            "shape": launch.notes, **c,
        }
        row["problems"] = viability(c, v.arch, half, use_dot)
        row["viable"] = not row["problems"]
        if with_roofline:
            row["roofline"] = roofline(v, launch, reference)
        rows.append(row)
    return {"variants": rows, "distinct_binaries": len(first), "compile_wall_seconds": round(wall, 1),
            "shared_per_block": {f"sm_{a}": SHARED_PER_BLOCK[a] for a in archs}, "peaks": PEAKS,
            "launch_seconds": LAUNCH_SECONDS}


def _environment() -> Dict[str, Any]:
    import triton

    from bench.compare_transformer_lens import git_state, versions

    ptxas = subprocess.run([str(_tool("ptxas")), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"versions": versions(), "triton": triton.__version__, "ptxas": ptxas[-1] if ptxas else None,
            "git": git_state(), "gpu": None}


def format_table(record: Dict[str, Any]) -> str:
    head = ("variant", "blocks", "w", "st", "regs", "spill", "smem KB", "TC", "grid", "H100 fused us", "ref us", "bound", "ok")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in record["variants"]:
        blocks = "x".join(str(b) for b in r["blocks"].values())
        h100 = r.get("roofline", {}).get("H100-SXM5-80GB")
        lines.append(" | ".join(str(x) for x in (
            r["name"], blocks, r["num_warps"], r["num_stages"], r.get("registers", "-"),
            r.get("spill_loads", 0) + r.get("spill_stores", 0) if r["compiled"] else "-",
            round(r.get("shared_bytes", 0) / 1024, 1), r.get("tensor_core_instructions", "-"),
            "x".join(map(str, r["grid"])),
            round(h100["fused"]["seconds"] * 1e6, 1) if h100 else "-",
            round(h100["reference"]["seconds_with_launches"] * 1e6, 1) if h100 else "-",
            h100["fused"]["bound"] if h100 else "-", "yes" if r["viable"] else "NO: " + "; ".join(r["problems"]))))
    viable = sum(r["viable"] for r in record["variants"])
    lines.append(f"\n{viable} of {len(record['variants'])} variants viable "
                 f"({record['distinct_binaries']} distinct binaries, compiled in {record['compile_wall_seconds']} s)")
    return "\n".join(lines)


def format_markdown(record: Dict[str, Any], model: str = "llama-3-8b", archs: Sequence[str] = ("sm_80", "sm_90")) -> str:
    """The README's summary: per kernel family and dtype, the worst resources over every shape on
    ``archs``, viability over all architectures, and the H100 roofline prediction for ``model``'s
    shape (fused vs unfused)."""
    archs = [a for a in archs if a in record["archs"]]
    families: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in record["variants"]:
        families.setdefault((r["op"] + (f" ({r['mode']})" if r["mode"] else ""), r["dtype"]), []).append(r)
    head = ["kernel", "dtype", "blocks", "warps / stages"]
    for arch in archs:
        head += [f"{arch} regs", f"{arch} smem KB", f"{arch} spills", f"{arch} TC instr"]
    head += ["H100 predicted: fused", "unfused reference", "bound", "viable (" + ", ".join(record["archs"]) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (family, dtype), rows in families.items():
        cells = [family, dtype, " / ".join(sorted({"x".join(map(str, r["blocks"].values())) for r in rows})),
                 " / ".join(sorted({f"{r['num_warps']} / {r['num_stages']}" for r in rows}))]
        for arch in archs:
            at = [r for r in rows if r["arch"] == arch]
            cells += [max(r["registers"] for r in at), round(max(r["shared_bytes"] for r in at) / 1024, 1),
                      sum(r["spill_loads"] + r["spill_stores"] for r in at),
                      "-" if dtype == "fp32" else min(r["tensor_core_instructions"] for r in at)]
        shown = next((r for r in rows if r["model"] == model and r.get("roofline") and r["component"] in (None, "q")), None)
        if shown:
            h100 = shown["roofline"]["H100-SXM5-80GB"]
            cells += [f"{h100['fused']['seconds'] * 1e3:.3f} ms",
                      f"{h100['reference']['seconds_with_launches'] * 1e3:.3f} ms ({shown['roofline']['reference_launches']} launches)",
                      h100["fused"]["bound"]]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{sum(r['viable'] for r in rows)}/{len(rows)}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=None, help="compute capabilities (default: 80 90, and 100 where supported)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiler processes")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline predictions")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the record")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--markdown", type=Path, default=None, help="read this record and print the README summary")
    args = p.parse_args(argv)
    if args.markdown:
        print(format_markdown(json.loads(args.markdown.read_text())))
        return {}
    missing = tools_missing()
    if missing:
        raise SystemExit(f"cannot compile kernels here: {missing}")
    archs = args.archs or supported_archs()
    record = {"environment": _environment(), "archs": [f"sm_{a}" for a in archs],
              **measure(archs, args.models, args.dtypes, args.workers, not args.no_roofline)}
    table = format_table(record)
    print(table.splitlines()[-1] if args.quiet else table)
    write_record(args.json, record, indent=1)
    return record


if __name__ == "__main__":
    main()
