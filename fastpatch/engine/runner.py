"""Drive a plan's chunks, apply the caller's metrics to each cell, gather the values."""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from tqdm.auto import tqdm

from fastpatch.engine import hooks_backend
from fastpatch.engine import stats as run_stats
from fastpatch.engine.distributed import gather, my_cells
from fastpatch.engine.distributed import shard as distributed_shard
from fastpatch.engine.native import backend as native_backend
from fastpatch.engine.native.cells import SUPPORTED_ACTIVATIONS
from fastpatch.engine.native.model import NativeModel, ParityError, UnsupportedModel
from fastpatch.engine.checks import cached_activation, check_cached_activation, check_metric_output
from fastpatch.engine.plan import Chunk, Sweep, cell_locations, cells_per_chunk, default_memory_budget, make_chunks

MetricFn = Callable[[torch.Tensor], torch.Tensor]
REDUCE_MODES = ("scalar", "mean", "none")


class MetricSet:
    """The caller's metric (or mapping of named metrics) with TransformerLens's shape rules."""

    def __init__(self, patching_metric: Union[MetricFn, Mapping[str, MetricFn]], reduce: str, batch: int):
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        if isinstance(patching_metric, Mapping):
            self.metrics: Dict[str, MetricFn] = dict(patching_metric)
            if not self.metrics:
                raise ValueError("patching_metric mapping must contain at least one metric")
            self.has_metric_axis = True
        else:
            if not callable(patching_metric):
                raise ValueError(f"patching_metric must be callable, got {type(patching_metric).__name__}")
            self.metrics = {"metric": patching_metric}
            self.has_metric_axis = False
        self.reduce = reduce
        self.per_example = reduce != "scalar"
        self.batch = batch

    @property
    def names(self) -> List[str]:
        return list(self.metrics)

    def value_shape(self) -> tuple:
        """Shape of one cell's values: ``[n_metrics, batch?]``."""
        return (len(self.metrics),) + ((self.batch,) if self.per_example else ())

    def common_reads(self) -> Optional[list]:
        """Each metric's ``LogitReads`` when all declare them at one position, else ``None``."""
        from fastpatch.metrics import logit_reads

        reads = [logit_reads(fn) for fn in self.metrics.values()]
        if any(r is None for r in reads) or len({r.position for r in reads}) != 1:
            return None
        return reads

    def _checked(self, name: str, out: Any, device: torch.device) -> torch.Tensor:
        out = torch.as_tensor(out)
        check_metric_output(out, name, self.per_example, self.batch, self.reduce)
        return out.detach().to(device=device, dtype=torch.float32)

    def evaluate_selected(self, selections: List[torch.Tensor]) -> torch.Tensor:
        """Every metric from the logits it reads (``metric.from_selected``), ``[n_metrics, batch?]``."""
        return torch.stack(
            [self._checked(name, fn.from_selected(sel), sel.device) for (name, fn), sel in zip(self.metrics.items(), selections)]
        )

    def evaluate(self, logits: torch.Tensor) -> torch.Tensor:
        """Every metric on one ``[batch, pos, d_vocab]`` slice, stacked to ``[n_metrics, batch?]``."""
        return torch.stack([self._checked(name, fn(logits), logits.device) for name, fn in self.metrics.items()])


def _probe_hooks(model: Any, tokens: torch.Tensor, hook_names: List[str]) -> Dict[str, tuple]:
    """Activation shapes (without batch) at each hook a plan patches, from one 1-row forward.

    Also proves each hook fires: a patch at a hook that never fires would silently do nothing.
    """
    shapes: Dict[str, tuple] = {}
    fwd_hooks = []
    for name in hook_names:
        if name not in model.hook_dict:
            raise ValueError(f"the model has no hook point {name!r} to patch")
        fwd_hooks.append((name, lambda act, hook, name=name: shapes.__setitem__(name, tuple(act.shape[1:]))))
    with torch.no_grad():
        model.run_with_hooks(tokens[:1], fwd_hooks=fwd_hooks)
    missing = [n for n in hook_names if n not in shapes]
    if missing:
        raise ValueError(f"hook points {missing} did not fire in a forward pass, so they cannot be patched")
    return shapes


def clean_activations_for(model: Any, tokens: torch.Tensor, clean_cache: Mapping, sweeps: List[Sweep]) -> Dict[str, torch.Tensor]:
    """The clean activation of every hook point the plan patches, validated against the model."""
    names = sorted({s.hook_name(layer) for s in sweeps for layer in set(s.indices[:, 0].tolist())})
    activations = {n: cached_activation(clean_cache, n) for n in names}
    shapes = _probe_hooks(model, tokens, names)
    for name, activation in activations.items():
        check_cached_activation(activation, name, tokens, shapes[name])
    return activations


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _with_oom_retry(chunks: List[Chunk], run: Callable[[Chunk], None]) -> None:
    """Run each chunk; one that does not fit in memory is halved and retried, down to one cell."""
    pending = deque(chunks)
    stats = run_stats.current()
    while pending:
        chunk = pending.popleft()
        try:
            run(chunk)
            if stats is not None:
                stats.chunk_done(len(chunk))
        except RuntimeError as error:
            if not _is_oom(error) or len(chunk) == 1:
                raise
            if stats is not None:
                stats.oom_retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mid = chunk.start + len(chunk) // 2
            pending.extendleft([Chunk(mid, chunk.stop), Chunk(chunk.start, mid)])


BACKENDS = ("auto", "native", "hooks")


def select_backend(model: Any, tokens: torch.Tensor, sweeps: List[Sweep], backend: str):
    """``(native model, corrupted trace)`` when the native backend runs this plan, ``None`` for hooks.

    ``"auto"`` uses the native backend where the model and every sweep are supported and its
    parity check passes, else the hook backend (with a warning if parity failed); ``"native"``
    raises instead of falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hooks":
        return None
    unsupported = sorted({s.activation_name for s in sweeps} - set(SUPPORTED_ACTIVATIONS))
    try:
        if unsupported:
            raise UnsupportedModel(f"the native backend does not patch {unsupported}")
        return NativeModel.checked(model, tokens)
    except UnsupportedModel:
        if backend == "native":
            raise
        return None
    except ParityError as error:
        if backend == "native":
            raise
        warnings.warn(f"{error}; using the hook backend", stacklevel=4)
        return None


def _run_hooks(model, tokens, sweeps, locations, clean, metrics, values, per_chunk, bar) -> None:
    batch = tokens.shape[0]

    def run(chunk: Chunk) -> None:
        logits = hooks_backend.run_chunk(model, tokens, sweeps, locations, chunk, clean)
        for local in range(len(chunk)):
            values[chunk.start + local] = metrics.evaluate(logits[local * batch : (local + 1) * batch])
        bar.update(len(chunk))

    _with_oom_retry(make_chunks(len(locations), per_chunk), run)


def run_native_cells(
    native, trace, metrics: MetricSet, groups: Dict[int, list], no_ops: List[int], resid_factory: Callable,
    values: torch.Tensor, *, budget: int, chunk_size: Optional[int], dtype_bytes: int, bar: Any,
) -> None:
    """Evaluate grouped native cells into ``values[cell]``.

    ``groups`` maps a first changed position to its ``(cell, entry block, entry stage)`` list;
    ``resid_factory(start)`` returns ``cell -> entry residual``. No-op cells get the baseline.
    """
    batch, n_pos = trace.logits.shape[:2]
    baseline = metrics.evaluate(trace.logits)
    for cell in no_ops:
        values[cell] = baseline
    bar.update(len(no_ops))
    reads = metrics.common_reads()
    read_pos = None if reads is None else reads[0].position % n_pos
    workspace = native_backend.LogitsWorkspace()
    for start, cells in groups.items():
        if read_pos is not None and read_pos < start:  # the metric reads a position the patch cannot reach
            for cell, _, _ in cells:
                values[cell] = baseline
            bar.update(len(cells))
            continue
        if chunk_size is not None:
            per_chunk = chunk_size
        else:
            row_bytes = native_backend.bytes_per_row(native, n_pos, start, reads is None, dtype_bytes)
            per_chunk = max(1, budget // row_bytes // batch)
        resid_of = resid_factory(start)

        def run(chunk: Chunk, start=start, cells=cells, resid_of=resid_of) -> None:
            read_index = None if reads is None else read_pos - start
            x, order = native_backend.run_chunk(native, trace, start, cells[chunk.start : chunk.stop], resid_of, read_index)
            if reads is None:
                for cell, logits in zip(order, native_backend.cell_logits(native, trace, x, start, workspace)):
                    values[cell] = metrics.evaluate(logits)
            else:
                x_read = x[:, 0]
                selections = [native_backend.read_logits(native, x_read, r.tokens, len(order)) for r in reads]
                for i, cell in enumerate(order):
                    values[cell] = metrics.evaluate_selected([sel[i * batch : (i + 1) * batch] for sel in selections])
            bar.update(len(order))

        _with_oom_retry(make_chunks(len(cells), per_chunk), run)


def native_budget(device: torch.device, chunk_size: Optional[int], memory_budget: Optional[int]) -> int:
    """Validate the chunking options and return the memory budget in bytes."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (cells per forward), got {chunk_size!r}")
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
    return budget


def run_plan(
    model: Any,
    tokens: torch.Tensor,
    clean_cache: Mapping,
    sweeps: List[Sweep],
    metrics: MetricSet,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    desc: str = "patching",
    distributed: Optional[bool] = None,
) -> List[torch.Tensor]:
    """Run every cell of every sweep; one ``[n_metrics, n_cells, batch?]`` tensor per sweep.

    Under ``torch.distributed`` (see ``fastpatch.engine.distributed``) this rank runs its share
    of the cells and every rank returns the full result.
    """
    device = torch.device(model.cfg.device) if getattr(model.cfg, "device", None) is not None else tokens.device
    rank_world = distributed_shard(distributed)
    engine = select_backend(model, tokens, sweeps, backend)
    clean = clean_activations_for(model, tokens, clean_cache, sweeps)
    all_locations = cell_locations(sweeps)
    mine = my_cells(len(all_locations), rank_world)
    locations = [all_locations[i] for i in mine]
    dtype_bytes = torch.finfo(getattr(model.cfg, "dtype", torch.float32) or torch.float32).bits // 8
    values = torch.empty((len(locations),) + metrics.value_shape(), device=device)
    with torch.no_grad(), run_stats.recording(device, len(locations)) as stats, tqdm(
        total=len(locations), desc=desc, disable=not progress, unit="cell"
    ) as bar:
        stats.backend = "hooks" if engine is None else "native"
        if engine is None:
            per_chunk = cells_per_chunk(
                model.cfg, tokens.shape[0], tokens.shape[1], dtype_bytes, device, chunk_size, memory_budget
            )
            _run_hooks(model, tokens, sweeps, locations, clean, metrics, values, per_chunk, bar)
        else:
            budget = native_budget(device, chunk_size, memory_budget)
            native, trace = engine
            groups, no_ops = native_backend.group_cells(native, trace, sweeps, locations, clean)
            run_native_cells(
                native, trace, metrics, groups, no_ops,
                lambda start: native_backend.sweep_resid(native, trace, sweeps, locations, clean, start),
                values, budget=budget, chunk_size=chunk_size, dtype_bytes=dtype_bytes, bar=bar,
            )
    values = gather(values, mine, len(all_locations), rank_world)
    # [cells, metrics, batch?] -> per sweep [metrics, cells, batch?]
    out, start = [], 0
    for sweep in sweeps:
        out.append(values[start : start + len(sweep)].movedim(0, 1))
        start += len(sweep)
    return out
