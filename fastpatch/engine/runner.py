"""Drive a plan's chunks, apply the caller's metrics to each cell, gather the values."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from tqdm.auto import tqdm

from fastpatch.engine import hooks_backend
from fastpatch.engine.checks import cached_activation, check_cached_activation, check_metric_output
from fastpatch.engine.plan import Chunk, Sweep, cell_locations, cells_per_chunk, make_chunks

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

    def evaluate(self, logits: torch.Tensor) -> torch.Tensor:
        """Every metric on one ``[batch, pos, d_vocab]`` slice, stacked to ``[n_metrics, batch?]``."""
        rows = []
        for name, fn in self.metrics.items():
            out = torch.as_tensor(fn(logits))
            check_metric_output(out, name, self.per_example, self.batch, self.reduce)
            rows.append(out.detach().to(device=logits.device, dtype=torch.float32))
        return torch.stack(rows)


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


def run_plan(
    model: Any,
    tokens: torch.Tensor,
    clean_cache: Mapping,
    sweeps: List[Sweep],
    metrics: MetricSet,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    desc: str = "patching",
) -> List[torch.Tensor]:
    """Run every cell of every sweep; one ``[n_metrics, n_cells, batch?]`` tensor per sweep."""
    device = torch.device(model.cfg.device) if getattr(model.cfg, "device", None) is not None else tokens.device
    clean = clean_activations_for(model, tokens, clean_cache, sweeps)
    locations = cell_locations(sweeps)
    dtype_bytes = torch.finfo(getattr(model.cfg, "dtype", torch.float32) or torch.float32).bits // 8
    per_chunk = cells_per_chunk(
        model.cfg, tokens.shape[0], tokens.shape[1], dtype_bytes, device, chunk_size, memory_budget
    )
    values = torch.empty((len(locations),) + metrics.value_shape(), device=device)
    batch = tokens.shape[0]
    pending = deque(make_chunks(len(locations), per_chunk))
    with torch.no_grad(), tqdm(total=len(locations), desc=desc, disable=not progress, unit="cell") as bar:
        while pending:
            chunk = pending.popleft()
            try:
                logits = hooks_backend.run_chunk(model, tokens, sweeps, locations, chunk, clean)
            except RuntimeError as error:  # halve a chunk that does not fit, down to one cell
                if not _is_oom(error) or len(chunk) == 1:
                    raise
                mid = chunk.start + len(chunk) // 2
                pending.extendleft([Chunk(mid, chunk.stop), Chunk(chunk.start, mid)])
                continue
            for local in range(len(chunk)):
                values[chunk.start + local] = metrics.evaluate(logits[local * batch : (local + 1) * batch])
            del logits
            bar.update(len(chunk))
    # [cells, metrics, batch?] -> per sweep [metrics, cells, batch?]
    out, start = [], 0
    for sweep in sweeps:
        out.append(values[start : start + len(sweep)].movedim(0, 1))
        start += len(sweep)
    return out
