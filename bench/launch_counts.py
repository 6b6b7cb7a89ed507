"""Count the device kernels each benchmark sweep would launch, fastpatch against TransformerLens.

On a GPU a sweep made of many small ops is bound by launch latency, not FLOPs. This script runs
every sweep of ``compare_transformer_lens.py`` (``SWEEPS`` there) on the same random-init model,
prompts, clean cache and metrics (the builders are imported from that script and from
``bench/models.py``), under ``torch.no_grad()``, and counts the ATen ops each library dispatches
with a ``TorchDispatchMode``. From the count it gives the *launch floor* (count x 5 us, a typical
CUDA kernel-launch overhead) beside the *FLOP time*: the sweep's lower-bound FLOPs (the compare
script's "lower-bound GFLOP", through the function that script uses) at published H100 SXM peaks,
989.4 TFLOP/s dense bf16 tensor-core and 66.9 TFLOP/s fp32 non-tensor, and says which dominates.
Time is not measured: the counts are deterministic.

What counts as a launch
-----------------------
Every ATen op that reaches the dispatcher counts as one kernel launch (``raw_ops`` records all
of them), except ops that launch no kernel on a GPU:

- views and metadata-only ops: every op whose schema returns an alias of an input
  (``OpOverload.is_view``: ``view``, ``reshape``'s view case, ``detach``, ``t``, ``transpose``,
  ``permute``, ``expand``, ``slice``, ``select``, ``unsqueeze``, ``squeeze``, ``as_strided``,
  ``alias``, ``split``, ``split_with_sizes``, ``unbind``, ``chunk``, ``narrow``, ``diagonal``,
  ``unfold``, ``lift_fresh``, ...), and by name ``_unsafe_view``, ``_reshape_alias``,
  ``view_as``, ``expand_as``, ``movedim``, ``lift_fresh``, ``lift_fresh_copy``;
- allocations without a fill (the caching allocator, no kernel): ``empty``, ``empty_like``,
  ``empty_strided``, ``new_empty``, ``new_empty_strided``, ``resize_``, ``set_``;
- size queries: ``sym_size``, ``sym_stride``, ``sym_numel``, ``sym_storage_offset``,
  ``is_contiguous``, ``is_same_size``.

``reshape`` / ``contiguous`` / ``flatten`` are composite: they reach the dispatcher as a view
(not counted) or as ``clone`` / ``_unsafe_view`` (the copy counted), exactly as on a GPU. The
excluded ops are recorded per op under ``excluded_ops`` so the rule can be audited.

Host tensors and host syncs
---------------------------
On a CPU every tensor is on the host, so the script tracks which tensors would stay on the host
in a GPU run: results of ``torch.tensor`` / ``as_tensor`` / ``from_numpy`` / ``zeros`` / ``ones``
/ ``empty`` / ``full`` / ``arange`` / ``randperm`` / ``randint`` / ``linspace`` called without a
``device`` argument, results of ``Tensor.cpu()``, and the outputs of any op whose tensor inputs
are all host tensors. Ops on host tensors are ``host_ops``, not launches.

``host_syncs`` counts where a GPU run would wait for the device: ``aten._local_scalar_dense``
(``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor), ``Tensor.cpu()``, ``.tolist()``,
``.numpy()`` of a device tensor, and the ops whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``, ``equal``, ``repeat_interleave`` with a tensor of repeats,
indexing with a boolean mask). Device-to-host copies (``_local_scalar_dense``, ``Tensor.cpu``)
also count as one launch each. Not seen: ``.to("cpu")`` (indistinguishable from ``.to(x.device)``
on a CPU run).

Caveats: one ATen op is usually one kernel on a GPU, but not always (a cuBLAS GEMM may add a
split-K reduction, SDPA may run two kernels, CPU-only decompositions can differ); CPU and CUDA
take the same dispatch path for everything these sweeps use. The count is a floor of launches
the way the code is written today, not of what the sweep needs.

TransformerLens's loop
----------------------
TransformerLens runs one ``model.run_with_hooks`` forward per cell (per source/destination pair
for direct path patching: 9,504 forwards on GPT-2 small). Counting all of them is slow on a CPU,
so by default (``--tl-samples``) each forward *kind* (its hook names with the layer numbers
removed, e.g. ``blocks.N.attn.hook_z``) runs for real ``--tl-samples`` times; the other forwards
return the last real forward's logits (their hooks are still called, uncounted, so any side
effect the loop checks happens) and add that kind's per-forward counts. Everything outside the
forwards (the metric, storing values, setup) is counted for every cell. The estimate is exact
when every forward of a kind dispatches the same ops, which the script checks on the samples
(``per_forward_constant``) and ``--tl-full`` checks outright: on the ``--small`` shape the full
count equals the sampled estimate (``bench/test_launch_counts.py``).

The JSON is rewritten after every sweep (``"partial": true`` until the run ends), so an
interrupted run keeps what it counted. Counting runs fastpatch's sweeps for real: on a 2-core CPU
the four activation sweeps on GPT-2 small take ~30 minutes, and fastpatch's direct path over all
9,504 GPT-2-small edges would take hours, so the committed direct-path count uses
the compare script's 4-layer direct-path shape (``launch-counts-direct-path-4L8H.json``).

Examples::

    python bench/launch_counts.py --sweeps get_act_patch_attn_head_out_all_pos get_act_patch_resid_pre \
        get_act_patch_attn_head_all_pos_every get_act_patch_block_every   # -> bench/results/launch-counts.json
    python bench/launch_counts.py --sweeps get_act_patch_direct_path_all_sources --layers 4 --d-model 512 \
        --heads 8 --batch 4 --positions 16 --out bench/results/launch-counts-direct-path-4L8H.json
    python bench/launch_counts.py --small --tl-full --out /tmp/launch-counts-small.json
    python bench/launch_counts.py --sweeps get_act_patch_attn_head_out_all_pos --metrics plain
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm (see compare_transformer_lens)

if __package__ in (None, ""):  # run as a script: make `bench` and `fastpatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import compare_transformer_lens as compare
from bench.gpu_costs import LAUNCH_SECONDS, PEAKS, launches_kernel
from bench.models import gpt2_small_shaped, ioi_like_tokens, logit_diff_metric

RESULTS_DIR = compare.RESULTS_DIR
DEFAULT_OUT = RESULTS_DIR / "launch-counts.json"

LAUNCH_US = LAUNCH_SECONDS * 1e6  # typical CUDA kernel-launch overhead per kernel, microseconds
H100_SXM_PEAKS = {"bf16_tensor_dense": PEAKS["H100-SXM5-80GB"]["bf16"], "fp32_non_tensor": PEAKS["H100-SXM5-80GB"]["fp32"]}

# Ops after which the host waits for the device (a device-to-host read or a data-dependent size).
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "equal"})
D2H_OPS = frozenset({"_local_scalar_dense"})  # syncs that are also a copy on the device stream
# Op classes, for the breakdown (what fusing or batching could remove).
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "einsum", "linear",
           "_efficient_attention_forward", "addmv", "mv", "dot"}
_COPY = {"copy_", "clone", "cat", "stack", "_to_copy", "index", "index_select", "gather", "index_put_",
         "index_put", "_index_put_impl_", "repeat", "repeat_interleave", "masked_scatter_", "scatter_",
         "fill_", "zero_", "zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like",
         "new_zeros", "new_ones", "new_full", "_local_scalar_dense", "Tensor.cpu", "masked_fill", "where",
         "constant_pad_nd", "tril", "triu"}
_REDUCE = {"sum", "mean", "amax", "max", "min", "amin", "any", "all", "argmax", "argmin", "var", "var_mean",
           "std", "norm", "linalg_vector_norm", "_softmax", "softmax", "_log_softmax", "logsumexp",
           "native_layer_norm", "layer_norm", "cumsum", "topk", "sort", "nonzero", "prod"}

_THIS_FILE = os.path.join("bench", "launch_counts.py")
_FACTORIES = ("tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange",
              "randperm", "randint", "linspace")


def op_class(name: str) -> str:
    """``matmul`` / ``copy/index/fill`` / ``reduction/norm/softmax`` / ``elementwise`` of an op name."""
    if name in _MATMUL:
        return "matmul"
    if name in _COPY:
        return "copy/index/fill"
    if name in _REDUCE:
        return "reduction/norm/softmax"
    return "elementwise"


class OpCounter(TorchDispatchMode):
    """Counts every dispatched ATen op: launches, excluded (no-kernel) ops, host ops, host syncs.

    ``attribute_to`` (a directory) records, per launch, the innermost frames under it (for
    "where do the launches come from"). Use :meth:`counting` to also see the Python-level
    host transfers and factories (see the module docstring).
    """

    def __init__(self, attribute_to: Optional[Path] = None, stack_depth: int = 3):
        super().__init__()
        self.raw = 0
        self.launches: Counter = Counter()  # op overload name -> launches
        self.excluded: Counter = Counter()
        self.syncs: Counter = Counter()
        self.host_ops = 0
        self.sources: Counter = Counter()
        self.paused = False
        self.host_mode = 0
        self._host: Dict[int, Any] = {}
        self._root = None if attribute_to is None else str(Path(attribute_to).resolve()) + os.sep
        self._depth = stack_depth

    # ---- host tracking ------------------------------------------------------------------------
    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def mark_host(self, out: Any) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = id(t)
                self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))

    # ---- totals -------------------------------------------------------------------------------
    def totals(self) -> Dict[str, int]:
        return {"launches": sum(self.launches.values()), "raw_ops": self.raw, "host_ops": self.host_ops,
                "host_syncs": sum(self.syncs.values())}

    def snapshot(self) -> Tuple[Dict[str, int], Counter, Counter]:
        return self.totals(), Counter(self.launches), Counter(self.syncs)

    def _source(self) -> str:
        frames: List[str] = []
        f = sys._getframe(2)
        while f is not None and len(frames) < self._depth:
            path = f.f_code.co_filename
            if path.startswith(self._root) and not path.endswith(_THIS_FILE):  # not this script's wrappers
                frames.append(f"{path[len(self._root):]}:{f.f_code.co_name}")
            f = f.f_back
        return " < ".join(frames) if frames else "(outside)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        self.raw += 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.host_mode or (tensors and all(self.is_host(t) for t in tensors)):
            self.host_ops += 1
            self.mark_host(out)
            return out
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                and len(args) > 1 and isinstance(args[1], torch.Tensor)
                                and kwargs.get("output_size") is None) or (
                name in ("index", "index_put_", "index_put", "_index_put_impl_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:2]))):
            self.syncs[str(func)] += 1
        if launches_kernel(func):
            self.launches[str(func)] += 1
            if self._root is not None:
                self.sources[self._source()] += 1
        else:
            self.excluded[str(func)] += 1
        return out

    # ---- Python-level transfers and factories ----------------------------------------------------
    @contextmanager
    def counting(self) -> Iterator["OpCounter"]:
        """Enter the mode, with ``Tensor.cpu/.tolist/.numpy`` and device-less factories tracked."""
        patched_tensor = {name: torch.Tensor.__dict__.get(name) for name in ("cpu", "tolist", "numpy")}
        originals = {name: getattr(torch.Tensor, name) for name in patched_tensor}
        factories = {name: getattr(torch, name) for name in _FACTORIES}
        counter = self

        def d2h(name: str) -> Callable:
            original = originals[name]

            def method(t, *args, **kwargs):
                if counter.paused or counter.is_host(t):
                    return original(t, *args, **kwargs)
                counter.syncs[f"Tensor.{name}"] += 1
                if name == "cpu":
                    counter.launches["Tensor.cpu"] += 1  # one device-to-host copy
                    out = original(t, *args, **kwargs)
                    if out is t:  # on a CPU run .cpu() returns the tensor itself: keep the device one apart
                        counter.paused = True
                        try:
                            out = t.clone()
                        finally:
                            counter.paused = False
                    counter.mark_host(out)
                    return out
                return original(t, *args, **kwargs)

            return method

        def factory(name: str) -> Callable:
            original = factories[name]

            def make(*args, **kwargs):
                on_host = kwargs.get("device") is None and not (
                    name == "as_tensor" and args and isinstance(args[0], torch.Tensor))
                if not on_host:
                    return original(*args, **kwargs)
                counter.host_mode += 1
                try:
                    out = original(*args, **kwargs)
                finally:
                    counter.host_mode -= 1
                counter.mark_host(out)
                return out

            return make

        for name in patched_tensor:
            setattr(torch.Tensor, name, d2h(name))
        for name in factories:
            setattr(torch, name, factory(name))
        try:
            with self:
                yield self
        finally:
            for name, own in patched_tensor.items():
                if own is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)
            for name, original in factories.items():
                setattr(torch, name, original)


def summary(counter: OpCounter, top: int = 12) -> Dict[str, Any]:
    """JSON summary of one count: totals, syncs by op, top ops, op classes, excluded ops."""
    classes: Counter = Counter()
    for op, n in counter.launches.items():
        classes[op_class(op.split(".")[1] if op.startswith("aten.") else op)] += n
    out = {
        **counter.totals(),
        "syncs_by_op": dict(counter.syncs.most_common()),
        "launches_by_class": dict(classes.most_common()),
        "top_ops": dict(counter.launches.most_common(top)),
        "excluded_ops": dict(counter.excluded.most_common()),
    }
    if counter.sources:
        out["top_sources"] = dict(counter.sources.most_common(top))
    return out


# ----------------------------------------------------------------------------- TransformerLens


def _kind(fwd_hooks: Sequence) -> str:
    return "+".join(sorted(re.sub(r"\d+", "N", str(name)) for name, _ in fwd_hooks)) or "(no hooks)"


@contextmanager
def sampled_forwards(model: Any, counter: OpCounter, samples: Optional[int]) -> Iterator[Dict[str, Any]]:
    """Replace ``model.run_with_hooks`` so that only ``samples`` forwards per kind run (all when None).

    Yields a record that fills in as the loop runs: per kind, the counted forwards' totals and
    launch Counters, and how many forwards were stood in for. See the module docstring.
    """
    real = model.run_with_hooks
    rec: Dict[str, Any] = {"kinds": {}, "calls": 0, "stubbed": 0}
    shapes: Dict[str, torch.Size] = {}
    last_logits: Dict[str, torch.Tensor] = {}

    def run_with_hooks(*args, fwd_hooks=(), **kwargs):
        rec["calls"] += 1
        kind = _kind(fwd_hooks)
        info = rec["kinds"].setdefault(kind, {"counted": [], "stubbed": 0, "launches": [], "syncs": []})
        if samples is None or len(info["counted"]) < samples:
            def recording(hook_fn, name):
                def hook(act, hook):
                    shapes[_kind([(name, None)])] = act.shape
                    return hook_fn(act, hook=hook)
                return hook

            hooks = [(name, recording(fn, name)) for name, fn in fwd_hooks]
            before, launches0, syncs0 = counter.snapshot()
            logits = real(*args, fwd_hooks=hooks, **kwargs)
            after, launches1, syncs1 = counter.snapshot()
            info["counted"].append({k: after[k] - before[k] for k in after})
            info["launches"].append(launches1 - launches0)
            info["syncs"].append(syncs1 - syncs0)
            last_logits[kind] = logits
            return logits
        info["stubbed"] += 1
        rec["stubbed"] += 1
        counter.paused = True  # the hooks' side effects (e.g. a "fired" flag), not their ops
        try:
            for name, fn in fwd_hooks:
                fn(torch.zeros(shapes[_kind([(name, None)])]), hook=model.hook_dict.get(name))
        finally:
            counter.paused = False
        return last_logits[kind]

    model.run_with_hooks = run_with_hooks
    try:
        yield rec
    finally:
        del model.run_with_hooks


def count_tl(call: Callable[[], Any], model: Any, samples: Optional[int]) -> Dict[str, Any]:
    """Launch counts of TransformerLens's loop ``call()``: counted outside the forwards, and per
    forward kind from ``samples`` real forwards each (every forward when ``samples`` is None)."""
    counter = OpCounter()
    with counter.counting(), sampled_forwards(model, counter, samples) as rec:
        call()
    totals = counter.totals()
    launches, syncs = Counter(counter.launches), Counter(counter.syncs)
    constant, per_forward = True, {}
    for kind, info in rec["kinds"].items():
        first = info["counted"][0]
        constant &= all(c == first for c in info["counted"]) and all(
            c == info["launches"][0] for c in info["launches"])
        per_forward[kind] = {**first, "forwards": len(info["counted"]) + info["stubbed"],
                             "counted_forwards": len(info["counted"])}
        for key in totals:
            totals[key] += info["stubbed"] * first[key]
        for op, n in info["launches"][0].items():
            launches[op] += info["stubbed"] * n
        for op, n in info["syncs"][0].items():
            syncs[op] += info["stubbed"] * n
    classes: Counter = Counter()
    for op, n in launches.items():
        classes[op_class(op.split(".")[1] if op.startswith("aten.") else op)] += n
    return {
        **totals,
        "method": "full" if samples is None or rec["stubbed"] == 0 else "sampled",
        "forwards": rec["calls"],
        "stubbed_forwards": rec["stubbed"],
        "per_forward": per_forward,
        "per_forward_constant": constant,
        "syncs_by_op": dict(syncs.most_common()),
        "launches_by_class": dict(classes.most_common()),
        "top_ops": dict(launches.most_common(12)),
        "excluded_ops_counted_part": dict(counter.excluded.most_common()),
    }


# ----------------------------------------------------------------------------- FLOPs


def flops_function() -> Callable:
    """The lower-bound FLOP function the compare script uses (wherever it imports it from)."""
    found = getattr(compare, "sweep_lower_bound_flops", None)
    if found is not None:
        return found
    import importlib
    import inspect

    match = re.search(r"from\s+([\w.]+)\s+import\s+[^\n]*\bsweep_lower_bound_flops\b", inspect.getsource(compare))
    if match is None:
        raise RuntimeError("bench/compare_transformer_lens.py no longer imports sweep_lower_bound_flops")
    return getattr(importlib.import_module(match.group(1)), "sweep_lower_bound_flops")


def full_forward_flops(cfg: Any, batch: int, n_pos: int) -> int:
    """FLOPs of one full forward (what each TransformerLens loop iteration computes): QKV/O and MLP
    GEMMs at every position, causal attention, full unembedding; norms and softmax left out."""
    d, L, V = int(cfg.d_model), int(cfg.n_layers), int(cfg.d_vocab)
    heads_dims = int(cfg.n_heads) * int(cfg.d_head)
    d_mlp = int(cfg.d_mlp)
    keys = n_pos * (n_pos + 1) // 2
    per_layer = n_pos * (2 * d * 3 * heads_dims + 2 * heads_dims * d + 2 * 2 * d * d_mlp) + 2 * 2 * heads_dims * keys
    return batch * (L * per_layer + n_pos * 2 * d * V)


def floors(launches: int, flops: Optional[float]) -> Dict[str, Any]:
    """Launch floor and FLOP times (ms) and which dominates at each H100 peak."""
    launch_ms = launches * LAUNCH_US / 1e3
    out: Dict[str, Any] = {"launch_floor_ms": launch_ms}
    for peak, rate in H100_SXM_PEAKS.items():
        flop_ms = None if flops is None else flops / rate * 1e3
        out[f"flop_ms_h100_{peak}"] = flop_ms
        out[f"dominates_h100_{peak}"] = None if flop_ms is None else ("launches" if launch_ms > flop_ms else "flops")
    return out


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Count the ATen ops (device kernel launches on a GPU) and host syncs of every "
                    "benchmark sweep of compare_transformer_lens.py, fastpatch's default backend against "
                    "TransformerLens's loop; report the launch floor at 5 us per launch beside the "
                    "lower-bound FLOP time at H100 peak; write a JSON and print a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sweeps", nargs="+", default=["all"], metavar="FN",
                   help=f"sweep functions ('all' for every one); choices: {', '.join(compare.SWEEPS)}")
    p.add_argument("--metrics", nargs="+", choices=compare.METRICS, default=list(compare.METRICS),
                   help="'plain' callable and/or fastpatch.metrics.LogitDiff")
    compare.add_shape_arguments(p, compare.SHAPES["gpt2-small"], batch_help="prompts per sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts")
    p.add_argument("--tl-samples", type=int, default=2,
                   help="real TransformerLens forwards counted per forward kind; the rest are stood in for")
    p.add_argument("--tl-full", action="store_true", help="count every TransformerLens forward (slow on GPT-2 small)")
    p.add_argument("--no-tl", action="store_true", help="count fastpatch only")
    p.add_argument("--fastpatch-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra keyword arguments for every fastpatch call, e.g. \'{"backend": "hooks"}\'')
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(compare.REPO_ROOT)}, "
                        "or launch-counts-small.json with --small)")
    return p


def setup(small: bool, seed: int, shape: Optional[Dict[str, int]] = None, corrupt_from: Optional[int] = None) -> Dict[str, Any]:
    """Model, prompts, caches and both metric objects, as ``compare_transformer_lens.run`` builds them
    (``shape``: the compare script's ``SHAPES`` keys; default its GPT-2-small or ``small`` shape)."""
    shape = shape or compare.SHAPES["small" if small else "gpt2-small"]
    if corrupt_from is None:
        corrupt_from = 10 if shape["positions"] > 10 else shape["positions"] // 2
    model = gpt2_small_shaped(seed, shape["layers"], shape["d_model"], shape["heads"], shape["vocab"])
    pair = ioi_like_tokens(shape["vocab"], shape["batch"], shape["positions"], corrupt_from, seed)
    from fastpatch.metrics import LogitDiff

    metrics = {"plain": logit_diff_metric(pair.answer, pair.wrong), "logitdiff": LogitDiff(pair.answer, pair.wrong)}
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pair.clean)
        _, corrupted_cache = model.run_with_cache(pair.corrupted)
    return {"shape": shape, "corrupt_from": corrupt_from, "model": model, "corrupted": pair.corrupted,
            "clean_cache": clean_cache, "corrupted_cache": corrupted_cache, "metrics": metrics}


def sweep_calls(lib: Any, sweep: str, metric: Any, s: Dict[str, Any], fp_kwargs: Optional[dict]) -> Callable[[], Any]:
    """The call of ``sweep`` in ``lib`` with the compare script's arguments (fastpatch: ``fp_kwargs``)."""
    fn = getattr(lib, sweep)
    model, corrupted = s["model"], s["corrupted"]
    kwargs = {} if fp_kwargs is None else dict(fp_kwargs)
    if "direct_path" in sweep:
        kwargs.pop("progress", None)
        return partial(fn, model, corrupted, s["clean_cache"], s["corrupted_cache"], metric, "q", verbose=False, **kwargs)
    return partial(fn, model, corrupted, s["clean_cache"], metric, **kwargs)


def count_fastpatch(call: Callable[[], Any]) -> Dict[str, Any]:
    import fastpatch

    counter = OpCounter(attribute_to=Path(fastpatch.__file__).resolve().parent.parent)
    with counter.counting():
        result = call()
    return {**summary(counter), "cells": int(compare.as_tensor(result).numel())}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from transformer_lens import patching as tl

    from fastpatch import patching as fp

    shape = {k: getattr(args, k) for k in compare.SHAPES["gpt2-small"]}
    s = setup(args.small, args.seed, shape, args.corrupt_from)
    model, shape = s["model"], s["shape"]
    fp_kwargs = {"progress": False, **args.fastpatch_kwargs}
    lb_flops = flops_function()
    tl_forward_flops = full_forward_flops(model.cfg, shape["batch"], shape["positions"])
    rows = []
    with torch.no_grad():
        # Warm both code paths up once, as the compare script does (lazy initialisation is not a launch).
        one_cell = tl.make_df_from_ranges([1, 1], ["layer", "pos"])
        warm = dict(patch_setter=tl.layer_pos_patch_setter, activation_name="resid_pre", index_df=one_cell)
        tl.generic_activation_patch(model, s["corrupted"], s["clean_cache"], s["metrics"]["plain"], **warm)
        fp.generic_activation_patch(model, s["corrupted"], s["clean_cache"], s["metrics"]["plain"], **warm, **fp_kwargs)
        for sweep in args.sweeps:
            for metric_name in args.metrics:
                metric = s["metrics"][metric_name]
                t0 = time.perf_counter()
                ours = count_fastpatch(sweep_calls(fp, sweep, metric, s, fp_kwargs))
                t1 = time.perf_counter()
                theirs = None if args.no_tl else count_tl(
                    sweep_calls(tl, sweep, metric, s, None), model, None if args.tl_full else args.tl_samples)
                t2 = time.perf_counter()
                flops = None if "direct_path" in sweep else lb_flops(
                    getattr(fp, sweep), model, s["corrupted"], s["clean_cache"], metric)
                row = {"sweep": sweep, "metric": metric_name, "cells": ours.pop("cells"), "lower_bound_flops": flops,
                       "fastpatch": {**ours, **floors(ours["launches"], flops)},
                       "count_seconds": {"fastpatch": round(t1 - t0, 2), "transformer_lens": round(t2 - t1, 2)}}
                if theirs is not None:
                    tl_flops = theirs["forwards"] * tl_forward_flops
                    row["transformer_lens"] = {
                        **theirs, **floors(theirs["launches"], flops),
                        "own_forward_flops": tl_flops,
                        **{f"own_flop_ms_h100_{k}": tl_flops / v * 1e3 for k, v in H100_SXM_PEAKS.items()},
                    }
                rows.append(row)
                if args.out is not None:  # partial results survive an interrupted run
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"partial": True, "results": rows}, indent=2) + "\n")
                print(f"  counted {sweep} / {metric_name}: fastpatch {ours['launches']} launches "
                      f"({t1 - t0:.1f} s), TransformerLens "
                      f"{'-' if theirs is None else theirs['launches']} ({t2 - t1:.1f} s)", flush=True)
    return {
        "benchmark": "launch_counts",
        "versions": compare.versions(),
        "git": compare.git_state(),
        "command": " ".join(["python", "bench/launch_counts.py", *sys.argv[1:]]) if args.argv is None
                   else " ".join(["python", "bench/launch_counts.py", *args.argv]),
        "config": {
            "model": compare.model_record(args),
            "batch": shape["batch"], "positions": shape["positions"], "corrupt_from": s["corrupt_from"],
            "small": bool(args.small), "grad_enabled": False, "dtype": "float32",
            "fastpatch_kwargs": fp_kwargs, "metrics": list(args.metrics), "sweeps": list(args.sweeps),
            "tl_method": "full" if args.tl_full else f"sampled: {args.tl_samples} real forwards per kind",
        },
        "assumptions": {
            "launch_overhead_us": LAUNCH_US,
            "h100_sxm_peak_flops": H100_SXM_PEAKS,
            "flop_bound": "the compare script's lower-bound FLOPs of the sweep (fastpatch's minimal compute; "
                          "None for direct path, which the compare script does not bound)",
            "tl_own_flops": "TransformerLens's forwards x one full forward's FLOPs (own_forward_flops)",
            "launch": "an ATen op that is not a view, metadata or allocation op (see bench/launch_counts.py)",
        },
        "results": rows,
    }


def format_table(record: Dict[str, Any]) -> str:
    header = (f"{'sweep':<26}{'metric':>10}{'fp launches':>12}{'fp syncs':>9}{'TL launches':>13}{'TL syncs':>9}"
              f"{'fp floor ms':>12}{'TL floor ms':>12}{'LB bf16 ms':>11}{'LB fp32 ms':>11}  fp / TL dominated by (bf16, fp32)")
    lines = []
    for r in record["results"]:
        ours, theirs = r["fastpatch"], r.get("transformer_lens")
        bf16, fp32 = ours["flop_ms_h100_bf16_tensor_dense"], ours["flop_ms_h100_fp32_non_tensor"]

        def dom(x):
            if x is None or x["dominates_h100_bf16_tensor_dense"] is None:
                return "n/a"
            return f"{x['dominates_h100_bf16_tensor_dense']}, {x['dominates_h100_fp32_non_tensor']}"

        lines.append(
            f"{compare.short_name(r['sweep']):<26}{r['metric']:>10}{ours['launches']:>12}{ours['host_syncs']:>9}"
            + (f"{'-':>13}{'-':>9}" if theirs is None else f"{theirs['launches']:>13}{theirs['host_syncs']:>9}")
            + f"{ours['launch_floor_ms']:>12.2f}"
            + (f"{'-':>12}" if theirs is None else f"{theirs['launch_floor_ms']:>12.2f}")
            + (f"{'-':>11}{'-':>11}" if bf16 is None else f"{bf16:>11.3f}{fp32:>11.2f}")
            + f"  {dom(ours)} / {dom(theirs)}"
        )
    return compare.format_rows(header, lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.device != "cpu":
        raise SystemExit("launch counts are taken on the CPU (the counts do not depend on the device)")
    compare.resolve_shape(args)
    if args.sweeps == ["all"]:
        args.sweeps = list(compare.SWEEPS)
    unknown = [s for s in args.sweeps if s not in compare.SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {list(compare.SWEEPS)} or 'all'")
    if args.out is None:
        args.out = RESULTS_DIR / ("launch-counts-small.json" if args.small else DEFAULT_OUT.name)
    record = run(args)
    print(format_table(record))
    compare.write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
