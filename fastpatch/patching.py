"""Drop-in, batched replacement for ``transformer_lens.patching`` (TransformerLens 4.3).

Change ``from transformer_lens import patching`` to ``from fastpatch import patching``: every
function has the same name, arguments, return type and values, but the cells of a sweep are
stacked along the batch dimension and run in a few large forward passes instead of one pass per
patch. Extra keyword-only arguments, all optional:

- ``chunk_size``: cells per batched forward (default: sized from ``memory_budget``).
- ``memory_budget``: bytes one batched forward may use (default: half the free GPU memory, or a
  quarter of free RAM capped at 4 GiB on CPU). Results never depend on the chunking.
- ``progress``: show a tqdm progress bar over the sweep's cells (default ``True``).
- ``distributed``: shard the cells over ``torch.distributed`` ranks; ``None`` (default) does so
  whenever a process group of more than one rank is initialised. Every rank gets the full result.
- ``backend``: ``"auto"`` (default: the native backend where the model and sweep are supported
  and its parity check against the model's own forward passes, else the hook backend),
  ``"native"`` (raise instead of falling back) or ``"hooks"`` (batched ``run_with_hooks``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens import patching as _tl
from transformer_lens.ActivationCache import ActivationCache

# The result class, the index helper and the setters are TransformerLens's own objects, so that
# ``isinstance(result, transformer_lens.patching.PatchingResult)`` holds and setters compare equal.
from transformer_lens.patching import (
    PatchingResult,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
)

from tqdm.auto import tqdm

from fastpatch.engine import stats as run_stats
from fastpatch.engine.distributed import gather, my_cells, shard
from fastpatch.engine.checks import (
    cached_activation,
    check_cached_activation,
    check_index_df,
    check_tokens,
    require_eval_mode,
)
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.engine.plan import Sweep, cells_per_chunk
from fastpatch.engine.runner import MetricFn, MetricSet, run_plan

__all__ = [
    "PatchingResult",
    "generic_activation_patch",
    "make_df_from_ranges",
    "layer_pos_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_block_every",
    "get_act_patch_direct_path",
    "get_act_patch_direct_path_all_sources",
]

AxisNames = _tl.AxisNames
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]
SweepReturn = Union[torch.Tensor, Tuple[torch.Tensor, pd.DataFrame], PatchingResult]


def _axis_limits(model: Any, activation_name: str, n_pos: int) -> dict:
    """The range of every axis name TransformerLens knows (K/V heads on grouped-query models)."""
    n_heads = model.cfg.n_heads
    if activation_name in ("k", "v") and getattr(model.cfg, "n_key_value_heads", None) is not None:
        n_heads = model.cfg.n_key_value_heads
    return {
        "layer": model.cfg.n_layers,
        "pos": n_pos,
        "src_pos": n_pos,
        "dest_pos": n_pos,
        "head_index": n_heads,
        "head": n_heads,
    }


def _index_table(
    model: Any,
    tokens: torch.Tensor,
    activation_name: str,
    index_axis_names: Optional[Sequence[str]],
    index_df: Optional[pd.DataFrame],
) -> Tuple[pd.DataFrame, Optional[Tuple[int, ...]]]:
    """The cells to run and, unless ``index_df`` was given (flat output), the grid's shape."""
    limits = _axis_limits(model, activation_name, tokens.shape[-1])
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give either index_axis_names or index_df")
        unknown = [a for a in index_axis_names if a not in limits]
        if unknown:
            raise ValueError(f"unknown index axis names {unknown}; known: {sorted(limits)}")
        grid = tuple(limits[a] for a in index_axis_names)
        return make_df_from_ranges(grid, index_axis_names), grid
    if index_axis_names is not None:
        raise ValueError("give index_axis_names or index_df, not both")
    check_index_df(index_df, limits)
    return index_df, None


def _as_result(
    store: torch.Tensor,
    metrics: MetricSet,
    index_df: pd.DataFrame,
    grid: Optional[Tuple[int, ...]],
    axis_names: Optional[Sequence[str]],
    baseline_values: Optional[torch.Tensor],
    baseline_requested: bool,
    return_index_df: bool,
) -> SweepReturn:
    """Shape one sweep's ``[n_metrics, n_cells, batch?]`` values the way TransformerLens returns them."""
    if grid is not None:
        store = store.reshape(store.shape[:1] + grid + store.shape[2:])
    if metrics.reduce == "mean":
        store = store.mean(dim=-1)
        if baseline_values is not None:
            baseline_values = baseline_values.mean(dim=-1)
    if not (metrics.has_metric_axis or metrics.reduce == "none" or baseline_requested):
        return (store[0], index_df) if return_index_df else store[0]
    keep_axis = metrics.has_metric_axis
    return PatchingResult(
        values=store if keep_axis else store[0],
        axis_names=[] if grid is None else list(axis_names or []),
        index_df=index_df,
        metric_names=metrics.names,
        reduced=metrics.reduce != "none",
        baseline=None if baseline_values is None else (baseline_values if keep_axis else baseline_values[0]),
        has_metric_axis=keep_axis,
    )


def _run(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    patching_metric: Union[MetricFn, Mapping[str, MetricFn]],
    requests: Sequence[Tuple[str, PatchSetter, Optional[Sequence[str]], Optional[pd.DataFrame]]],
    *,
    return_index_df: bool,
    reduce: str,
    baseline: bool,
    chunk_size: Optional[int],
    memory_budget: Optional[int],
    progress: bool,
    backend: str,
    desc: str,
    distributed: Optional[bool] = None,
) -> List[Tuple[SweepReturn, Optional[torch.Tensor], MetricSet, pd.DataFrame, Optional[tuple], Optional[Sequence[str]]]]:
    """Validate, run every requested sweep in one plan, and return the pieces of each result."""
    require_eval_mode(model, operation="activation patching")
    metrics = MetricSet(patching_metric, reduce, batch=0)
    if (metrics.has_metric_axis or reduce == "none" or baseline) and return_index_df:
        raise ValueError("return_index_df only applies to the tensor return; a PatchingResult carries index_df")
    check_tokens(model, corrupted_tokens)
    metrics.batch = int(corrupted_tokens.shape[0])
    tables = [_index_table(model, corrupted_tokens, name, axes, df) for name, _, axes, df in requests]
    sweeps = [Sweep(name, setter, df) for (name, setter, _, _), (df, _) in zip(requests, tables)]
    with preserved_model_state(model):
        baseline_values = None
        if baseline:
            with torch.no_grad():
                baseline_values = metrics.evaluate(model.run_with_hooks(corrupted_tokens, fwd_hooks=[]))
        stores = run_plan(
            model,
            corrupted_tokens,
            clean_cache,
            sweeps,
            metrics,
            backend=backend,
            distributed=distributed,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            progress=progress,
            desc=desc,
        )
    return [
        (store, baseline_values, metrics, df, grid, axes)
        for store, (df, grid), (_, _, axes, _) in zip(stores, tables, requests)
    ]


def generic_activation_patch(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Union[MetricFn, Mapping[str, MetricFn]],
    patch_setter: PatchSetter,
    activation_name: str,
    index_axis_names: Optional[Sequence[AxisNames]] = None,
    index_df: Optional[pd.DataFrame] = None,
    return_index_df: bool = False,
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    backend: str = "auto",
    distributed: Optional[bool] = None,
) -> SweepReturn:
    """Batched ``transformer_lens.patching.generic_activation_patch``: same arguments, same values.

    Each cell (row of ``index_df``, or point of the ``index_axis_names`` grid) patches the clean
    activation into its own ``[batch]`` row block of a stacked corrupted forward; the metric sees
    each cell's ``[batch, pos, d_vocab]`` logits, exactly the tensor TransformerLens would pass it.
    A caller's own ``patch_setter`` is called per cell on that row block.

    Returns:
        ``[*grid]`` (or ``[len(index_df)]``) metric values; ``(values, index_df)`` with
        ``return_index_df``; a ``PatchingResult`` with ``reduce="none"``, ``baseline=True`` or a
        mapping of metrics. Values live on ``model.cfg.device`` in float32.
    """
    [(store, base, metrics, df, grid, axes)] = _run(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        [(activation_name, patch_setter, index_axis_names, index_df)],
        return_index_df=return_index_df,
        reduce=reduce,
        baseline=baseline,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        progress=progress,
        backend=backend,
        distributed=distributed,
        desc=f"patching {activation_name}",
    )
    return _as_result(store, metrics, df, grid, axes, base, baseline, return_index_df)


def _named_sweep(tl_sweep: partial) -> partial:
    """``partial(generic_activation_patch, ...)`` with the same bound arguments and docstring as TransformerLens's."""
    ours = partial(generic_activation_patch, **tl_sweep.keywords)
    ours.__doc__ = tl_sweep.__doc__
    return ours


get_act_patch_resid_pre = _named_sweep(_tl.get_act_patch_resid_pre)
get_act_patch_resid_mid = _named_sweep(_tl.get_act_patch_resid_mid)
get_act_patch_attn_out = _named_sweep(_tl.get_act_patch_attn_out)
get_act_patch_mlp_out = _named_sweep(_tl.get_act_patch_mlp_out)
get_act_patch_attn_head_out_by_pos = _named_sweep(_tl.get_act_patch_attn_head_out_by_pos)
get_act_patch_attn_head_q_by_pos = _named_sweep(_tl.get_act_patch_attn_head_q_by_pos)
get_act_patch_attn_head_k_by_pos = _named_sweep(_tl.get_act_patch_attn_head_k_by_pos)
get_act_patch_attn_head_v_by_pos = _named_sweep(_tl.get_act_patch_attn_head_v_by_pos)
get_act_patch_attn_head_pattern_by_pos = _named_sweep(_tl.get_act_patch_attn_head_pattern_by_pos)
get_act_patch_attn_head_pattern_dest_src_pos = _named_sweep(_tl.get_act_patch_attn_head_pattern_dest_src_pos)
get_act_patch_attn_head_out_all_pos = _named_sweep(_tl.get_act_patch_attn_head_out_all_pos)
get_act_patch_attn_head_q_all_pos = _named_sweep(_tl.get_act_patch_attn_head_q_all_pos)
get_act_patch_attn_head_k_all_pos = _named_sweep(_tl.get_act_patch_attn_head_k_all_pos)
get_act_patch_attn_head_v_all_pos = _named_sweep(_tl.get_act_patch_attn_head_v_all_pos)
get_act_patch_attn_head_pattern_all_pos = _named_sweep(_tl.get_act_patch_attn_head_pattern_all_pos)


def _every(
    sweeps: Sequence[partial],
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Union[MetricFn, Mapping[str, MetricFn]],
    kwargs: dict,
    desc: str,
) -> List[SweepReturn]:
    """Run several named sweeps in one batched plan; each result as TransformerLens's helper gets it.

    TransformerLens passes ``baseline=True`` to the first sweep only (the baseline is computed
    once) and wraps the other sweeps' tensors into results; so do we.
    """
    baseline = bool(kwargs.pop("baseline", False))
    unknown = set(kwargs) - {"reduce", "chunk_size", "memory_budget", "progress", "backend", "distributed"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    pieces = _run(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        [(s.keywords["activation_name"], s.keywords["patch_setter"], s.keywords["index_axis_names"], None) for s in sweeps],
        return_index_df=False,
        reduce=kwargs.get("reduce", "scalar"),
        baseline=baseline,
        chunk_size=kwargs.get("chunk_size"),
        memory_budget=kwargs.get("memory_budget"),
        progress=kwargs.get("progress", True),
        backend=kwargs.get("backend", "auto"),
        distributed=kwargs.get("distributed"),
        desc=desc,
    )
    results = []
    for i, (store, base, metrics, df, grid, axes) in enumerate(pieces):
        first = i == 0
        out = _as_result(store, metrics, df, grid, axes, base if first else None, baseline and first, False)
        if baseline and isinstance(out, torch.Tensor):
            out = _tl._wrap_tensor_result(out, axes)
        results.append(out)
    return results


def _pad_heads(tensors: List[torch.Tensor], n_heads: int) -> None:
    """Zero-pad the K and V sweeps of a grouped-query model to ``n_heads`` (TransformerLens's layout)."""
    for i in (2, 3):
        tensors[i] = torch.nn.functional.pad(tensors[i], (0, n_heads - tensors[i].size(-1)))


_HEAD_ALL_POS = (
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_pattern_all_pos,
)
_HEAD_BY_POS = (
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_head_pattern_by_pos,
)
_BLOCK = (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[torch.Tensor, "patch_type layer head"], PatchingResult]:
    """Every head (all positions) for out, q, k, v, pattern, in one batched plan: ``[5, n_layers, n_heads]``.

    K/V sweeps of grouped-query models are zero-padded to ``n_heads``. ``reduce``/``baseline``
    (and fastpatch's ``chunk_size``/``memory_budget``/``progress``) are accepted as keywords; with
    ``reduce="none"``, ``baseline=True`` or a metric mapping a ``PatchingResult`` with a leading
    ``patch_type`` axis is returned, as in TransformerLens.
    """
    results = _every(_HEAD_ALL_POS, model, corrupted_tokens, clean_cache, metric, kwargs, "patching heads")
    if all(isinstance(r, torch.Tensor) for r in results):
        _pad_heads(results, results[0].size(-1))
        return torch.stack(results, dim=0)
    return _tl._stack_patch_types(
        results, axis_order=("layer", "head"), n_heads=model.cfg.n_heads, type_names=_tl._HEAD_TYPES
    )


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[torch.Tensor, "patch_type layer pos head"], PatchingResult]:
    """Every head by position for out, q, k, v, pattern, in one batched plan: ``[5, n_layers, pos, n_heads]``.

    The pattern sweep is rearranged from ``[layer, head, dest_pos]`` to ``[layer, pos, head]``
    and grouped-query K/V sweeps are zero-padded, as in TransformerLens.
    """
    results = _every(_HEAD_BY_POS, model, corrupted_tokens, clean_cache, metric, kwargs, "patching heads by position")
    if all(isinstance(r, torch.Tensor) for r in results):
        _pad_heads(results, results[0].size(-1))
        results[4] = results[4].transpose(-1, -2)
        return torch.stack(results, dim=0)
    return _tl._stack_patch_types(
        results, axis_order=("layer", "pos", "head"), n_heads=model.cfg.n_heads, type_names=_tl._HEAD_TYPES
    )


def get_act_patch_block_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[torch.Tensor, "patch_type layer pos"], PatchingResult]:
    """resid_pre, attn_out and mlp_out by position, in one batched plan: ``[3, n_layers, pos]``."""
    results = _every(_BLOCK, model, corrupted_tokens, clean_cache, metric, kwargs, "patching blocks")
    if all(isinstance(r, torch.Tensor) for r in results):
        return torch.stack(results, dim=0)
    return _tl._stack_patch_types(results, axis_order=("layer", "pos"), n_heads=0, type_names=_tl._BLOCK_TYPES)


# ---- direct path patching ------------------------------------------------------------------------
def _direct_path(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: MetricFn,
    sources: List[Tuple[int, int]],
    component: str,
    verbose: bool,
    method: str,
    backend: str,
    chunk_size: Optional[int],
    memory_budget: Optional[int],
    operation: str,
    distributed: Optional[bool],
) -> torch.Tensor:
    """Values ``[n_sources, n_cells_per_source...]`` flattened per the reader; see the public functions."""
    from fastpatch.engine import direct_path as dp
    from fastpatch.engine.runner import native_budget, select_backend

    if component not in dp.READERS:
        raise ValueError(f"component must be one of {dp.READERS}, got {component!r}")
    if method not in dp.METHODS:
        raise ValueError(f"method must be one of {dp.METHODS}, got {method!r}")
    cfg = model.cfg
    for layer, head in sources:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"source head ({layer}, {head}) is out of range for {cfg.n_layers} layers x {cfg.n_heads} heads")
    _tl._check_direct_path_support(model, sorted({l for l, _ in sources}), component if component in "qkv" else "q")
    require_eval_mode(model, operation=operation)
    check_tokens(model, corrupted_tokens)
    for layer in sorted({l for l, _ in sources}):
        name = f"blocks.{layer}.attn.hook_z"
        for cache, what in ((clean_cache, "clean_cache"), (corrupted_cache, "corrupted_cache")):
            check_cached_activation(cached_activation(cache, name, what), name, corrupted_tokens)
    metrics = MetricSet(patching_metric, "scalar", int(corrupted_tokens.shape[0]))
    device = torch.device(cfg.device) if getattr(cfg, "device", None) is not None else corrupted_tokens.device
    rank_world = shard(distributed)
    with preserved_model_state(model), torch.no_grad():
        engine = select_backend(model, corrupted_tokens, [], backend)
        if engine is None and method == "linear":
            raise ValueError("method='linear' needs the native backend, which this model or backend choice rules out")
        deltas = dp.source_writes(model, clean_cache, corrupted_cache, sources)
        native = engine[0] if engine is not None else None
        cells = dp.path_cells(model, sources, component, parallel=bool(cfg.parallel_attn_mlp))
        mine = my_cells(len(cells), rank_world)
        local_cells = [cells[i] for i in mine]
        values = torch.empty((len(local_cells), 1), device=device)
        dtype_bytes = torch.finfo(deltas.dtype).bits // 8
        with run_stats.recording(device, len(local_cells)) as stats, tqdm(
            total=len(local_cells), desc=f"direct path [{component}]", disable=not verbose, unit="path"
        ) as bar:
            stats.backend = "hooks" if engine is None else "native"
            if engine is None:
                per_chunk = cells_per_chunk(cfg, corrupted_tokens.shape[0], corrupted_tokens.shape[1], dtype_bytes, device, chunk_size, memory_budget)
                dp.run_hooks(model, corrupted_tokens, deltas, local_cells, component, metrics, values, per_chunk, bar)
            else:
                budget = native_budget(device, chunk_size, memory_budget)
                paths = dp.NativePaths(native, engine[1], deltas, sources, component, method)
                paths.run(local_cells, metrics, values, budget=budget, chunk_size=chunk_size, dtype_bytes=dtype_bytes, bar=bar)
        values = gather(values, mine, len(cells), rank_world)
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    shape = {"logits": (), "mlp_in": (n_layers,)}.get(component, (n_layers, n_heads))
    out = torch.zeros((len(sources),) + shape, device=device)
    for (s, layer, head), value in zip(cells, values[:, 0]):
        index = {"logits": (s,), "mlp_in": (s, layer)}.get(component, (s, layer, head))
        out[index] = value
    return out


def get_act_patch_direct_path(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: MetricFn,
    src_layer: int,
    src_head: int,
    component: str = "q",
    verbose: bool = True,
    *,
    method: str = "exact",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Batched ``transformer_lens.patching.get_act_patch_direct_path``: same arguments, same values.

    Head ``(src_layer, src_head)``'s clean-minus-corrupted write ``z @ W_O`` is added to one
    reader's own pre-norm copy of the residual; every other reader still sees the corrupted run.
    ``results[l, h]`` is the metric with the path into head ``(l, h)``'s ``component`` input
    patched; rows ``l <= src_layer`` are 0.0 placeholders (as in TransformerLens).

    Beyond TransformerLens: ``component="mlp_in"`` patches the path into each block's MLP input
    (result ``[n_layers]``, 0.0 where the MLP cannot read the source) and ``component="logits"``
    the direct path into the final norm (a 0-d result). ``method="linear"`` freezes the reader's
    norm scale at the corrupted run's (LayerNorm-linearised, TransformerLens issue #111); it needs
    the native backend. Same refusals as TransformerLens: K/V on grouped-query models,
    post-norm or scaled-residual source blocks, training mode.
    """
    out = _direct_path(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, [(src_layer, src_head)],
        component, verbose, method, backend, chunk_size, memory_budget, "get_act_patch_direct_path()", distributed,
    )
    return out[0]


def get_act_patch_direct_path_all_sources(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: MetricFn,
    component: str = "q",
    verbose: bool = True,
    *,
    method: str = "exact",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> Float[torch.Tensor, "n_layers n_heads n_layers n_heads"]:
    """:func:`get_act_patch_direct_path` from every source head, all in one batched plan.

    ``results[sl, sh, dl, dh]`` is the metric with the path from head ``(sl, sh)`` into head
    ``(dl, dh)`` patched, 0.0 where ``dl <= sl`` (``[n_layers, n_heads, n_layers]`` for
    ``mlp_in``, ``[n_layers, n_heads]`` for ``logits``).
    """
    cfg = model.cfg
    sources = [(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    out = _direct_path(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, sources, component, verbose,
        method, backend, chunk_size, memory_budget, "get_act_patch_direct_path_all_sources()", distributed,
    )
    return out.reshape((cfg.n_layers, cfg.n_heads) + out.shape[1:])
