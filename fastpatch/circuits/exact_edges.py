"""The exact effect of every edge, batched.

An edge ``writer -> reader`` (``fastpatch.engine.edge_plan``: the embedding, every head and every
MLP write; every head's Q, K and V input, every MLP input and the logits read) is patched alone:
the reader's input receives the writer's clean output in place of its corrupted one, everything
else stays corrupted, and the rest of the forward is recomputed downstream (TransformerLens's
direct path patching, ``get_act_patch_direct_path``, for head writers into Q/K/V). The noising
direction runs the clean prompt with the writer's corrupted output into the reader; a ``source``
(an ablation cache of ``fastpatch.sources``) stands for the run whose outputs are patched in.

All edges are cells of one plan run by the batched driver (``engine.driver.run_plan``). On the
native backend every edge into a reader of layer ``l`` joins the forward at layer ``l``, reusing
the unpatched run before it and the positions before the write's first change; only the reader
is recomputed for the patched rows, and a metric that declares its logits
(``fastpatch.metrics.LogitDiff``) gets only those. The hooks backend runs one hooked forward per
chunk of stacked edges on any TransformerLens model.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from fastpatch.attribution.edges import EdgeScores
from fastpatch.attribution.passes import Runs, capture, patch_values
from fastpatch.circuits.evaluate import writer_hook_names
from fastpatch.engine.checks import check_tokens, require_eval_mode
from fastpatch.engine.driver import RunOptions, run_plan
from fastpatch.engine.edge_plan import EdgePlan
from fastpatch.engine.metric_set import MetricFn, MetricSet
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.sources import DIRECTIONS, resolve_direction

__all__ = ["DIRECTIONS", "exact_edges"]

# the spellings of the first release, before every entry point took ``sources.DIRECTIONS``
_OLD_DIRECTIONS = {"denoise": "denoising", "noise": "noising"}


def exact_edges(
    model: Any,
    clean_tokens: Optional[Int[Tensor, "batch pos"]],
    corrupted_tokens: Optional[Int[Tensor, "batch pos"]],
    patching_metric: MetricFn,
    *,
    direction: str = "denoising",
    source: Optional[Mapping[str, Tensor]] = None,
    per_position: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = False,
    distributed: Optional[bool] = None,
) -> EdgeScores:
    """The exact effect on ``patching_metric`` of patching each writer -> reader edge alone.

    Signature and result are stable (the faithfulness benchmark compares attribution against it).

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) in eval mode.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids of the same shape (the one whose
            run is patched in may be ``None`` when ``source`` is given).
        patching_metric: ``logits [batch, pos, d_vocab] -> 0-d tensor`` (e.g. the batch mean of a
            per-prompt quantity, or a ``fastpatch.metrics`` metric, which declares the logits it
            reads so only those are computed).
        direction: ``"denoising"`` (default): the corrupted run with the writer's clean output into the
            reader; ``"noising"``: the clean run with the writer's corrupted output into the reader
            (``fastpatch.sources.resolve_direction``, as every sweep; the first release's ``"denoise"`` /
            ``"noise"`` still work, with a ``FutureWarning``).
        source: an activation cache (e.g. ``fastpatch.sources.zero_ablation(model, clean_tokens)``) holding
            ``hook_embed`` and every block's ``attn.hook_z`` and ``hook_mlp_out``, patched in instead of a run on
            tokens: the writes are the source's outputs minus the patched run's. The tokens it replaces
            (``clean_tokens`` when denoising) must be ``None``.
        per_position: one edge per position ``p`` (the writer's write at ``p`` only, into the reader
            at ``p``; scores ``[n_writers, n_readers, pos]``). A position where the write is the
            same in both runs (e.g. before the prompts first differ) is not run: its effect is 0.
        backend, chunk_size, memory_budget, progress, distributed: as every ``fastpatch.patching``
            sweep (``backend``: ``"auto"``, ``"native"`` or ``"hooks"``).

    Returns:
        :class:`~fastpatch.attribution.EdgeScores`, laid out exactly as
        ``fastpatch.attribution.get_attr_patch_edges``'s result: ``scores[w, r]`` is
        ``metric(edge patched) - metric(unpatched run)`` (``baseline``: the unpatched run's metric,
        the corrupted run's for ``"denoising"``), 0 where the reader does not read the writer. On
        grouped-query models each K/V reader is a K/V head (``"L{l}KV{g}.k"``): its input is
        patched, which changes the keys/values of every query head of its group.

    Raises:
        ValueError: bad arguments (direction, token shapes or ids, a metric that is not callable or
            does not return a 0-d tensor), a model in training mode, or an unsupported source
            block (as TransformerLens's direct path patching).
    """
    if direction in _OLD_DIRECTIONS:
        warnings.warn(f"direction={direction!r} is now spelled {_OLD_DIRECTIONS[direction]!r}", FutureWarning, stacklevel=2)
        direction = _OLD_DIRECTIONS[direction]
    if not isinstance(per_position, bool):
        raise ValueError(f"per_position must be True or False, got {per_position!r}")
    run = resolve_direction(clean_tokens, corrupted_tokens, source, direction)
    require_eval_mode(model, operation="exact_edges()")
    check_tokens(model, run.target, run.target_name)
    if run.values is not None:
        check_tokens(model, run.values, run.values_name)
        if run.values.shape != run.target.shape:
            raise ValueError(
                f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens {tuple(corrupted_tokens.shape)} must have "
                "the same shape: an edge's write is patched prompt by prompt, position by position"
            )
    base = run.target
    metrics = MetricSet(patching_metric, "scalar", int(base.shape[0]))
    names = writer_hook_names(model.cfg)
    with preserved_model_state(model), torch.no_grad():
        source_cache = patch_values(model, Runs(base, run.values, source), names)  # checked against base's shape
        base_cache = capture(model, base, names)
    plan = EdgePlan(model, base, source_cache, base_cache, per_position)
    options = RunOptions(backend, chunk_size, memory_budget, progress, distributed)
    values = run_plan(model, base, plan, metrics, options, baseline=True)
    baseline = values.baseline[0]
    layout = plan.layout
    return EdgeScores(
        scores=plan.scores(values.cells[:, 0] - baseline),
        valid=plan.valid.to(baseline.device),
        writer_names=layout.writer_names,
        reader_names=layout.reader_names,
        baseline=float(baseline),
    )
