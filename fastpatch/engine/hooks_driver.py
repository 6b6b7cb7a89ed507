"""Hooks driver: evaluate a plan's cells through ``run_with_hooks``, chunk by chunk.

Each chunk is one batched forward (``PatchPlan.patched_logits``: cell ``c`` owns rows
``[c * batch, (c + 1) * batch)``); the metrics then see each cell's own ``[batch, pos, d_vocab]``
slice, exactly the tensor TransformerLens would pass them.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from fastpatch.engine.chunks import Chunk, make_chunks
from fastpatch.engine.metric_set import MetricSet, capture_hooks
from fastpatch.engine.oom import run_with_oom_retry
from fastpatch.engine.plan import PatchPlan


def run_hooks_cells(
    plan: PatchPlan, cells: Sequence[Any], metrics: MetricSet, values: Tensor, per_chunk: int, bar: Any
) -> None:
    """Write every cell's ``[n_metrics, batch?]`` values into ``values[i]`` (``i``: its place in ``cells``).

    Metrics that read activations get each cell's rows of the activations captured in its chunk's forward.
    """
    names = metrics.activation_names
    capture, acts = capture_hooks(names)

    def run(chunk: Chunk) -> None:
        if names:
            acts.clear()
            logits = plan.patched_logits(cells[chunk.start : chunk.stop], capture=capture)
            values[chunk.start : chunk.stop] = metrics.evaluate_cells(logits, dict(acts))
        else:
            values[chunk.start : chunk.stop] = metrics.evaluate_cells(plan.patched_logits(cells[chunk.start : chunk.stop]))
        bar.update(len(chunk))

    with plan.hooks_context():
        run_with_oom_retry(make_chunks(len(cells), per_chunk), run)
