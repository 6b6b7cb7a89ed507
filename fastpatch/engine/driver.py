"""The one driver of every batched plan (activation sweeps and direct paths alike).

``run_plan`` is where a plan meets the machine: it validates the chunking options, picks the
backend, shards the cells over ``torch.distributed`` ranks, records the run's stats, shows the
progress bar, hands this rank's cells to the hooks or the native driver, and gathers the
values. It also leaves the model as it found it and computes the corrupted baseline on request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from fastpatch.engine import stats as run_stats
from fastpatch.engine.backend_choice import select_backend
from fastpatch.engine.chunks import ChunkBudget, forward_bytes_per_row
from fastpatch.engine.distributed import gather, my_cells, shard
from fastpatch.engine.hooks_driver import run_hooks_cells
from fastpatch.engine.metric_set import MetricSet, capture_hooks
from fastpatch.engine.model_state import preserved_model_state, refuse_user_hooks
from fastpatch.engine.native_driver import run_native_cells
from fastpatch.engine.plan import NativeWork, PatchPlan


@dataclass(frozen=True)
class RunOptions:
    """fastpatch's own keywords of every batched call (see ``fastpatch.patching``)."""

    backend: str = "auto"
    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    progress: bool = True
    distributed: Optional[bool] = None
    #: a model carrying the caller's own hooks: ``"refuse"`` (ValueError) or ``"per_cell"`` (hook
    #: backend, one cell per forward, so each hook sees exactly the forward TransformerLens runs)
    user_hooks: str = "refuse"


USER_HOOKS = ("refuse", "per_cell")
PER_CELL_REMEDY = "pass user_hooks='per_cell' to run each patch's forward alone with them on the hook backend"


class PlanValues(NamedTuple):
    """A plan's metric values: every cell's, and the unpatched corrupted run's when asked for."""

    cells: Float[Tensor, "n_cells n_metrics ..."]
    baseline: Optional[Float[Tensor, "n_metrics ..."]]


def _record_work(stats: run_stats.RunStats, work: NativeWork, batch: int, n_pos: int, n_layers: int) -> None:
    """The native work's size: no-op cells, and each grouped cell's rows x positions from its first
    changed position x blocks from its entry block."""
    stats.no_op_cells += len(work.no_ops)
    for start, members in work.groups.items():
        for member in members:
            stats.computed(batch, n_pos - start, n_layers - member.block)


def model_device(model: Any, tokens: Tensor) -> torch.device:
    """Where a run's values live: the model's configured device, else the tokens'."""
    device = getattr(model.cfg, "device", None)
    return torch.device(device) if device is not None else tokens.device


def _check_activation_reads(model: Any, plan: PatchPlan, names: List[str]) -> Optional[str]:
    """For metrics that read activations: refuse unknown hook names and plans that cannot capture them;
    the reason the native backend cannot run them (``None`` when no metric reads activations)."""
    if not names:
        return None
    missing = [n for n in names if n not in (getattr(model, "hook_dict", {}) or {})]
    if missing:
        raise ValueError(f"a metric reads activations at {missing}, which are not hook points of this model")
    if not plan.captures_activations:
        raise ValueError(f"{plan.label}: metrics that read activations ({names}) are not supported for this kind of plan yet")
    return plan.native_activation_reason(names, model.cfg.n_layers)


def _baseline(model: Any, tokens: Tensor, metrics: MetricSet) -> Tensor:
    """The metrics on the unpatched corrupted run (with its activations for metrics that read them)."""
    capture, acts = capture_hooks(metrics.activation_names)
    logits = model.run_with_hooks(tokens, fwd_hooks=capture)
    return metrics.evaluate(logits, acts if capture else None)


def run_plan(
    model: Any, tokens: Tensor, plan: PatchPlan, metrics: MetricSet, options: RunOptions, *, baseline: bool = False
) -> PlanValues:
    """Run every cell of ``plan`` on ``tokens`` (the corrupted run) and return their metric values.

    Under ``torch.distributed`` (see ``fastpatch.engine.distributed``) this rank runs its share
    of the cells and every rank returns the full result. Values are float32 on the model's device.
    """
    if options.user_hooks not in USER_HOOKS:
        raise ValueError(f"user_hooks must be one of {USER_HOOKS}, got {options.user_hooks!r}")
    per_cell = options.user_hooks == "per_cell"
    if per_cell and options.backend == "native":
        raise ValueError("user_hooks='per_cell' runs on the hook backend; pass backend='hooks' (or 'auto')")
    if per_cell and plan.needs_native is not None:
        raise ValueError(f"user_hooks='per_cell' needs the hook backend, but {plan.needs_native}")
    if not per_cell:
        refuse_user_hooks(model, plan.label, PER_CELL_REMEDY)
    native_unsupported = plan.native_unsupported or _check_activation_reads(model, plan, metrics.activation_names)
    device = model_device(model, tokens)
    budget = ChunkBudget.from_options(options.chunk_size, options.memory_budget, device)
    rank_world = shard(options.distributed)
    batch, n_pos = tokens.shape
    dtype_bytes = torch.finfo(getattr(model.cfg, "dtype", torch.float32) or torch.float32).bits // 8
    with preserved_model_state(model), torch.no_grad():
        baseline_values = _baseline(model, tokens, metrics) if baseline else None
        engine = None if per_cell else select_backend(model, tokens, options.backend, native_unsupported)
        if engine is None and plan.needs_native is not None:
            raise ValueError(plan.needs_native)
        plan.prepare(engine)
        mine = my_cells(len(plan.cells), rank_world)
        cells = [plan.cells[i] for i in mine]
        values = torch.empty((len(cells),) + metrics.value_shape(), device=device)
        with run_stats.recording(device, len(cells)) as stats, tqdm(
            total=len(cells), desc=plan.label, disable=not options.progress, unit=plan.unit
        ) as bar:
            stats.backend = "hooks" if engine is None else "native"
            if engine is None:
                per_chunk = 1 if per_cell else budget.cells_per_chunk(forward_bytes_per_row(model.cfg, n_pos, dtype_bytes), batch)
                run_hooks_cells(plan, cells, metrics, values, per_chunk, bar)
                stats.computed(batch, n_pos, int(model.cfg.n_layers), cells=len(cells))
            else:
                work = plan.native_work(engine, cells)
                _record_work(stats, work, batch, n_pos, int(model.cfg.n_layers))
                run_native_cells(engine, work, metrics, values, budget, dtype_bytes, bar)
    return PlanValues(gather(values, mine, len(plan.cells), rank_world), baseline_values)
