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
- ``user_hooks``: a model that carries hooks of the caller's (``hook_point.add_hook(...)``) is
  refused with a ``ValueError`` naming them (``"refuse"``, default), since a batched forward would
  call them on many patches' rows at once; ``"per_cell"`` runs each patch's forward alone on the
  hook backend with those hooks, so a metric that reads them gets TransformerLens's numbers.

This module is the API layer only: it validates the arguments, builds a plan
(``fastpatch.engine.activation_plan`` or ``fastpatch.engine.direct_path``), hands it to the one
driver (``fastpatch.engine.driver.run_plan``) and shapes the values as TransformerLens returns
them. See ``docs/architecture.md``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

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

from fastpatch._tl_private import (
    BLOCK_TYPES,
    HEAD_TYPES,
    stack_patch_types,
    wrap_tensor_result,
)
from fastpatch.engine import sweep_groups
from fastpatch.engine.activation_plan import ActivationPlan
from fastpatch.engine.checks import check_tokens, require_eval_mode
from fastpatch.engine.direct_path import DirectPathPlan
from fastpatch.engine.driver import RunOptions, run_plan
from fastpatch.engine.joint_plan import JointPatch, JointPlan, PatchSetter, joint_sweeps
from fastpatch.engine.metric_set import MetricFn, MetricSet
from fastpatch.engine.plan import Sweep, index_table
from fastpatch.sources import DIRECTIONS, resolve_direction

__all__ = [
    "AxisNames",
    "Logits",
    "CorruptedActivation",
    "PatchedActivation",
    "MetricFn",
    "Reduce",
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
    "get_act_patch_attn_head_scores_by_pos",
    "get_act_patch_attn_head_scores_dest_src_pos",
    "get_act_patch_attn_head_scores_all_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_block_every",
    "get_act_patch_direct_path",
    "get_act_patch_direct_path_all_sources",
    "DIRECTIONS",
    "run_sweep",
    "get_act_patch_together",
]

# TransformerLens's public type aliases, the same objects, so annotations written for it still hold.
AxisNames = _tl.AxisNames
Logits = _tl.Logits
CorruptedActivation = _tl.CorruptedActivation
PatchedActivation = _tl.PatchedActivation
Reduce = _tl.Reduce
SweepReturn = Union[torch.Tensor, Tuple[torch.Tensor, pd.DataFrame], PatchingResult]


class _SweepRequest(NamedTuple):
    """One sweep a call asks for, as ``generic_activation_patch`` takes it."""

    activation_name: str
    patch_setter: PatchSetter
    index_axis_names: Optional[Sequence[str]]
    index_df: Optional[pd.DataFrame]


class _SweepValues(NamedTuple):
    """One sweep's values and what shaping them into TransformerLens's return needs."""

    values: torch.Tensor  # [n_metrics, n_cells, batch?]
    baseline: Optional[torch.Tensor]  # [n_metrics, batch?]
    metrics: MetricSet
    index_df: pd.DataFrame
    grid: Optional[Tuple[int, ...]]  # None: flat output (the caller gave index_df)
    axis_names: Optional[Sequence[str]]


def _as_result(sweep: _SweepValues, baseline_requested: bool, return_index_df: bool) -> SweepReturn:
    """Shape one sweep's values the way TransformerLens returns them."""
    store, baseline_values, metrics = sweep.values, sweep.baseline, sweep.metrics
    if sweep.grid is not None:
        store = store.reshape(store.shape[:1] + sweep.grid + store.shape[2:])
    if metrics.reduce == "mean":
        store = store.mean(dim=-1)
        if baseline_values is not None:
            baseline_values = baseline_values.mean(dim=-1)
    if not (metrics.has_metric_axis or metrics.reduce == "none" or baseline_requested):
        return (store[0], sweep.index_df) if return_index_df else store[0]
    keep_axis = metrics.has_metric_axis
    return PatchingResult(
        values=store if keep_axis else store[0],
        axis_names=[] if sweep.grid is None else list(sweep.axis_names or []),
        index_df=sweep.index_df,
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
    requests: Sequence[_SweepRequest],
    *,
    return_index_df: bool,
    reduce: str,
    baseline: bool,
    options: RunOptions,
    desc: str,
) -> List[_SweepValues]:
    """Validate, then run every requested sweep in one plan."""
    require_eval_mode(model, operation="activation patching")
    metrics = MetricSet(patching_metric, reduce, batch=0)
    if (metrics.has_metric_axis or reduce == "none" or baseline) and return_index_df:
        raise ValueError("return_index_df only applies to the tensor return; a PatchingResult carries index_df")
    check_tokens(model, corrupted_tokens)
    metrics.batch = int(corrupted_tokens.shape[0])
    n_pos = corrupted_tokens.shape[-1]
    tables = [index_table(model, n_pos, r.activation_name, r.index_axis_names, r.index_df) for r in requests]
    sweeps = [Sweep(r.activation_name, r.patch_setter, df) for r, (df, _) in zip(requests, tables)]
    plan = ActivationPlan(model, corrupted_tokens, clean_cache, sweeps, label=desc)
    values, baseline_values = run_plan(model, corrupted_tokens, plan, metrics, options, baseline=baseline)
    return [
        _SweepValues(store, baseline_values, metrics, df, grid, r.index_axis_names)
        for store, (df, grid), r in zip(plan.per_sweep(values), tables, requests)
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
    user_hooks: str = "refuse",
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
    [sweep] = _run(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        [_SweepRequest(activation_name, patch_setter, index_axis_names, index_df)],
        return_index_df=return_index_df,
        reduce=reduce,
        baseline=baseline,
        options=RunOptions(backend, chunk_size, memory_budget, progress, distributed, user_hooks),
        desc=f"patching {activation_name}",
    )
    return _as_result(sweep, baseline, return_index_df)


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


def _scores_sweep(tl_pattern_sweep: partial) -> partial:
    """The pattern sweep's setter and cells on the pre-softmax scores (``hook_attn_scores``, the causal
    mask as ``-inf``): TransformerLens has no named sweep for them, but patches them the same way
    (``generic_activation_patch(..., activation_name="attn_scores")``), and so do these."""
    ours = partial(generic_activation_patch, **{**tl_pattern_sweep.keywords, "activation_name": "attn_scores"})
    ours.__doc__ = (
        f"``{tl_pattern_sweep.func.__name__}`` with the pattern sweep's setter and index axes "
        f"{tuple(tl_pattern_sweep.keywords['index_axis_names'])} on ``attn_scores`` instead of ``pattern``."
    )
    return ours


get_act_patch_attn_head_scores_by_pos = _scores_sweep(_tl.get_act_patch_attn_head_pattern_by_pos)
get_act_patch_attn_head_scores_dest_src_pos = _scores_sweep(_tl.get_act_patch_attn_head_pattern_dest_src_pos)
get_act_patch_attn_head_scores_all_pos = _scores_sweep(_tl.get_act_patch_attn_head_pattern_all_pos)


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
    unknown = set(kwargs) - {"reduce", "chunk_size", "memory_budget", "progress", "backend", "distributed", "user_hooks"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    reduce = kwargs.pop("reduce", "scalar")
    pieces = _run(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        [_SweepRequest(sweep.keywords["activation_name"], sweep.keywords["patch_setter"], sweep.keywords["index_axis_names"], None)
         for sweep in sweeps],
        return_index_df=False,
        reduce=reduce,
        baseline=baseline,
        options=RunOptions(**kwargs),
        desc=desc,
    )
    results = []
    for i, piece in enumerate(pieces):
        first = i == 0
        out = _as_result(piece._replace(baseline=piece.baseline if first else None), baseline and first, False)
        if baseline and isinstance(out, torch.Tensor):
            out = wrap_tensor_result(out, piece.axis_names)
        results.append(out)
    return results


def _sweeps(names: Sequence[str]) -> Tuple[Any, ...]:
    """This module's ``get_act_patch_<name>`` functions for the engine's sweep group ``names``."""
    return tuple(globals()[f"get_act_patch_{name}"] for name in names)


_HEAD_ALL_POS = _sweeps(sweep_groups.HEAD_ALL_POS)
_HEAD_BY_POS = _sweeps(sweep_groups.HEAD_BY_POS)
_BLOCK = _sweeps(sweep_groups.BLOCK)


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
        return sweep_groups.stack_head_sweeps(results, results[0].size(-1), by_pos=False)
    return stack_patch_types(
        results, axis_order=("layer", "head"), n_heads=model.cfg.n_heads, type_names=HEAD_TYPES
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
        return sweep_groups.stack_head_sweeps(results, results[0].size(-1), by_pos=True)
    return stack_patch_types(
        results, axis_order=("layer", "pos", "head"), n_heads=model.cfg.n_heads, type_names=HEAD_TYPES
    )


def get_act_patch_block_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[torch.Tensor, "patch_type layer pos"], PatchingResult]:
    """resid_pre, attn_out and mlp_out by position, in one batched plan: ``[3, n_layers, pos]``."""
    results = _every(_BLOCK, model, corrupted_tokens, clean_cache, metric, kwargs, "patching blocks")
    if all(isinstance(r, torch.Tensor) for r in results):
        return torch.stack(results, dim=0)
    return stack_patch_types(results, axis_order=("layer", "pos"), n_heads=0, type_names=BLOCK_TYPES)


# ---- direct path patching ------------------------------------------------------------------------
def _direct_path(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: MetricFn,
    sources: List[Tuple[int, int]],
    component: str,
    method: str,
    options: RunOptions,
    operation: str,
) -> torch.Tensor:
    """Values ``[n_sources, *reader_shape]`` of every path from ``sources``; see the public functions."""
    plan = DirectPathPlan(model, corrupted_tokens, clean_cache, corrupted_cache, sources, component, method)
    require_eval_mode(model, operation=operation)
    check_tokens(model, corrupted_tokens)
    metrics = MetricSet(patching_metric, "scalar", int(corrupted_tokens.shape[0]))
    return plan.result(run_plan(model, corrupted_tokens, plan, metrics, options).cells)


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
    user_hooks: str = "refuse",
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
    the native backend. On grouped-query models a ``k``/``v`` reader is a K/V head (result
    ``[n_layers, n_key_value_heads]``; TransformerLens refuses these, see ``fastpatch.engine.direct_path``).
    Same refusals as TransformerLens otherwise: post-norm or scaled-residual source blocks, training mode.
    """
    options = RunOptions(backend, chunk_size, memory_budget, verbose, distributed, user_hooks)
    return _direct_path(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, [(src_layer, src_head)], component,
        method, options, "get_act_patch_direct_path()",
    )[0]


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
    user_hooks: str = "refuse",
) -> Float[torch.Tensor, "n_layers n_heads n_layers n_heads"]:
    """:func:`get_act_patch_direct_path` from every source head, all in one batched plan.

    ``results[sl, sh, dl, dh]`` is the metric with the path from head ``(sl, sh)`` into head
    ``(dl, dh)`` patched, 0.0 where ``dl <= sl`` (``[n_layers, n_heads, n_layers]`` for
    ``mlp_in``, ``[n_layers, n_heads]`` for ``logits``).
    """
    cfg = model.cfg
    sources = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    options = RunOptions(backend, chunk_size, memory_budget, verbose, distributed, user_hooks)
    out = _direct_path(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, sources, component,
        method, options, "get_act_patch_direct_path_all_sources()",
    )
    return out.reshape((cfg.n_layers, cfg.n_heads) + out.shape[1:])


# ---- direction -----------------------------------------------------------------------------------
_DIRECT_PATH = (get_act_patch_direct_path, get_act_patch_direct_path_all_sources)


def run_sweep(
    sweep: Callable[..., Any],
    model: Any,
    clean_tokens: Optional[Int[torch.Tensor, "batch pos"]],
    corrupted_tokens: Optional[Int[torch.Tensor, "batch pos"]],
    patching_metric: Any,
    *,
    direction: str = "denoising",
    source: Optional[Mapping[str, torch.Tensor]] = None,
    **kwargs: Any,
) -> Any:
    """Run ``sweep`` (any sweep of this module, e.g. ``get_act_patch_resid_pre``) in a named direction.

    - ``direction="denoising"`` (default): the clean run's activations patched into the corrupted run,
      ``sweep(model, corrupted_tokens, clean_cache, patching_metric, **kwargs)``. Asks which
      activations *suffice* to restore the clean behaviour.
    - ``"noising"``: the corrupted run's activations patched into the clean run,
      ``sweep(model, clean_tokens, corrupted_cache, patching_metric, **kwargs)``. Asks which
      activations are *necessary*: where does losing the clean value break the behaviour?
    - ``source`` (e.g. an ablation from :mod:`fastpatch.sources`) replaces the cache of the run
      whose activations are patched in: ``clean_tokens`` (denoising) or ``corrupted_tokens``
      (noising) must then be ``None``.

    Direct path sweeps get the patched run's own cache as their ``corrupted_cache``. The caches are
    one ``run_with_cache`` each; ``kwargs`` go to ``sweep`` unchanged, and so does its return value.
    """
    if not callable(sweep):
        raise ValueError(f"sweep must be a sweep function of fastpatch.patching, got {type(sweep).__name__}")
    run = resolve_direction(clean_tokens, corrupted_tokens, source, direction)
    check_tokens(model, run.target, run.target_name)
    if run.values is not None:
        check_tokens(model, run.values, run.values_name)
        require_eval_mode(model, operation="run_sweep()")
    with torch.no_grad():
        values = source if run.values is None else model.run_with_cache(run.values)[1]
        if sweep in _DIRECT_PATH:
            target_cache = model.run_with_cache(run.target)[1]
            return sweep(model, run.target, values, target_cache, patching_metric, **kwargs)
    return sweep(model, run.target, values, patching_metric, **kwargs)


# ---- several slices in one cell ------------------------------------------------------------------
def get_act_patch_together(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Union[MetricFn, Mapping[str, MetricFn]],
    cells: Sequence[Sequence[JointPatch]],
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    backend: str = "auto",
    distributed: Optional[bool] = None,
    user_hooks: str = "refuse",
) -> Union[Float[torch.Tensor, " n_cells"], PatchingResult]:
    """Cells that patch several slices at once ("these two heads together"), batched.

    ``cells[i]`` is a list of patches ``(activation_name, index)``: ``index`` as a row of the
    ``index_df`` of TransformerLens's sweep of that activation (layer first; e.g. ``("z", (layer,
    head))`` for a head at all positions, ``("z", (layer, pos, head))`` by position,
    ``("resid_pre", (layer, pos))``, ``("pattern", (layer, head, dest_pos))``), patched with that
    sweep's setter; ``(activation_name, index, patch_setter)`` names a setter of your own. Every
    patch of a cell writes the clean values into the same forward, as a TransformerLens loop with
    one hook per patch would. Returns ``[n_cells]`` metric values (a ``PatchingResult`` with
    ``reduce="none"``, ``baseline=True`` or a metric mapping, as the sweeps return). Runs on the
    hook backend (the native backend patches one slice per cell; ``backend="native"`` raises).
    """
    require_eval_mode(model, operation="activation patching")
    metrics = MetricSet(patching_metric, reduce, batch=0)
    check_tokens(model, corrupted_tokens)
    metrics.batch = int(corrupted_tokens.shape[0])
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence) or len(cells) == 0:
        raise ValueError("cells must be a non-empty list of cells, each a list of (activation_name, index) patches")
    sweeps, joint = joint_sweeps(model, corrupted_tokens.shape[-1], cells)
    plan = JointPlan(model, corrupted_tokens, clean_cache, sweeps, joint)
    options = RunOptions(backend, chunk_size, memory_budget, progress, distributed, user_hooks)
    values, baseline_values = run_plan(model, corrupted_tokens, plan, metrics, options, baseline=baseline)
    index_df = pd.DataFrame({"cell": range(len(joint))})
    piece = _SweepValues(values.movedim(0, 1), baseline_values, metrics, index_df, None, None)
    return _as_result(piece, baseline, False)
