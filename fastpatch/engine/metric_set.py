"""The caller's metrics, applied to each cell with TransformerLens's shape rules.

The engine's contract with a metric: any callable of ``[batch, pos, d_vocab]`` logits. A metric
may also declare what it reads (:func:`logit_reads`): a ``reads`` attribute with ``position``
(one sequence position) and ``tokens`` (``[batch, k]`` token ids, or ``None`` for the whole
vocabulary row), and a ``from_selected`` method that computes the metric from those logits
alone (``[batch, k]``, or ``[batch, d_vocab]``). A metric that reads several positions declares
``positions`` (a tuple) and ``position = None``, and its ``from_selected`` takes the rows of every
position stacked in that order, ``[batch, n_positions, k or d_vocab]``. A metric that reads
activations of the patched run declares ``activation_reads`` (hook names) and computes
``from_activations(logits, acts)``; the hook backend captures those activations per cell
(:func:`activation_reads`). One that also declares ``reads_logits = False`` is given ``None`` for
the logits, so a backend need not compute them (:func:`reads_logits`); one that declares
``activation_positions`` (sequence positions) reads its activations at those positions only (an
attention pattern's destinations), so a backend may leave the others uncomputed (as NaN).
``fastpatch.metrics`` implements that protocol; the engine never imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.engine.checks import check_metric_output

# Every patching metric's type: ``logits [batch, pos, d_vocab] -> value`` (0-d, or ``[batch]``).
MetricFn = Callable[[Tensor], Tensor]
REDUCE_MODES = ("scalar", "mean", "none")


def logit_reads(metric: Any) -> Optional[Any]:
    """What ``metric`` declares it reads of the logits (``.position``, ``.tokens``), or ``None``
    when it needs the full logits: any callable without both ``reads`` and ``from_selected``."""
    reads = getattr(metric, "reads", None)
    if reads is None or not callable(getattr(metric, "from_selected", None)):
        return None
    return reads


def activation_reads(metric: Any) -> Tuple[str, ...]:
    """The hook names whose activations ``metric`` reads (``()`` for a metric of the logits alone)."""
    names = getattr(metric, "activation_reads", None)
    if not names or not callable(getattr(metric, "from_activations", None)):
        return ()
    return tuple(names)


def reads_logits(metric: Any) -> bool:
    """Whether ``metric`` reads the logits: all but a metric of activations declaring ``reads_logits = False``."""
    return not (activation_reads(metric) and getattr(metric, "reads_logits", True) is False)


def capture_hooks(names: Sequence[str], detach: bool = True) -> Tuple[List[Tuple[str, Callable]], Dict[str, Tensor]]:
    """Hooks that keep the activation at each of ``names`` (the last forward's) in the returned dict
    (with its autograd graph when not ``detach``: attribution differentiates a metric through them)."""
    acts: Dict[str, Tensor] = {}

    def keeper(name: str) -> Callable:
        def keep(activation: Tensor, hook: Any) -> None:
            acts[name] = activation.detach() if detach else activation

        return keep

    return [(name, keeper(name)) for name in names], acts


def read_positions(reads: Any) -> Tuple[int, ...]:
    """Every position a declared read covers, in ``from_selected``'s order."""
    positions = getattr(reads, "positions", None)
    return tuple(positions) if positions else (reads.position,)


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

    @property
    def activation_names(self) -> List[str]:
        """Every hook name some metric reads activations of, in first-use order."""
        return list(dict.fromkeys(n for fn in self.metrics.values() for n in activation_reads(fn)))

    def activation_positions(self) -> Optional[List[int]]:
        """Every position at which the metrics that read activations read them, when each declares its
        ``activation_positions``, else ``None`` (as given: negative positions count from the end)."""
        out: List[int] = []
        for fn in self.metrics.values():
            if activation_reads(fn):
                positions = getattr(fn, "activation_positions", None)
                if positions is None:
                    return None
                out.extend(positions)
        return out

    @property
    def needs_logits(self) -> bool:
        """Whether some metric reads the logits (see :func:`reads_logits`)."""
        return any(reads_logits(fn) for fn in self.metrics.values())

    def common_reads(self) -> Optional[list]:
        """The declared reads of each metric that reads the logits, in order, when every such metric declares
        them (at any positions), else ``None``; ``[]`` when no metric reads the logits."""
        reads = [logit_reads(fn) for fn in self.metrics.values() if reads_logits(fn)]
        return None if any(r is None for r in reads) else reads

    def _checked(self, name: str, out: Any, device: torch.device) -> Tensor:
        out = torch.as_tensor(out)
        check_metric_output(out, name, self.per_example, self.batch, self.reduce)
        return out.detach().to(device=device, dtype=torch.float32)

    def evaluate_selected(
        self, selections: List[Tensor], acts: Optional[Mapping[str, Tensor]] = None, device: Optional[torch.device] = None
    ) -> Float[Tensor, "n_metrics ..."]:
        """Every metric from the logits it reads (``metric.from_selected``; ``selections`` holds one entry per
        metric of :meth:`common_reads`), and metrics that read no logits from ``acts``: ``[n_metrics, batch?]``
        on ``device`` (default: the selections')."""
        if device is None:
            device = selections[0].device
        selected = iter(selections)
        return torch.stack([
            self._checked(name, fn.from_selected(next(selected)) if reads_logits(fn) else self._value(fn, None, acts), device)
            for name, fn in self.metrics.items()
        ])

    def _value(self, fn: Any, logits: Optional[Tensor], acts: Optional[Mapping[str, Tensor]]) -> Any:
        if not activation_reads(fn):
            return fn(logits)
        if acts is None:
            raise ValueError("this backend cannot capture the activations a metric reads")  # a plan bug, not bad input
        return fn.from_activations(logits if reads_logits(fn) else None, acts)

    def evaluate(
        self, logits: Optional[Float[Tensor, "batch pos d_vocab"]], acts: Optional[Mapping[str, Tensor]] = None,
        device: Optional[torch.device] = None,
    ) -> Float[Tensor, "n_metrics ..."]:
        """Every metric on one cell's logits (and ``acts``: its activations, for metrics that read them),
        stacked to ``[n_metrics, batch?]`` on ``device`` (default: the logits'). ``logits`` may be ``None``
        when no metric reads them (:attr:`needs_logits`)."""
        if device is None:
            device = logits.device
        return torch.stack([self._checked(name, self._value(fn, logits, acts), device) for name, fn in self.metrics.items()])

    def evaluate_cells(
        self, logits: Float[Tensor, "cells_x_batch pos d_vocab"], acts: Optional[Mapping[str, Tensor]] = None
    ) -> Float[Tensor, "cells n_metrics ..."]:
        """Every metric on each cell's ``[batch]`` row block of a stacked forward's logits (and activations)."""
        n_cells, b = logits.shape[0] // self.batch, self.batch
        return torch.stack([
            self.evaluate(logits[c * b : (c + 1) * b], None if acts is None else {n: a[c * b : (c + 1) * b] for n, a in acts.items()})
            for c in range(n_cells)
        ])
