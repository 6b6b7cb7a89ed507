"""Attention attribution on one batch of prompts: which attention edges ``dest -> src`` the metric uses.

:func:`get_attention_attribution` scores every cell of every attention pattern of a single run
(no corrupted prompt): Hao et al. 2021, "Self-Attention Attribution: Interpreting Information
Interactions Inside Transformer".

- ``integrated=False`` (default): ``pattern * d metric / d pattern`` at the run -- the first-order
  term of scaling a cell's attention weight to zero (gradient times input), from one forward and
  one backward for the whole batch and every layer. Summed over the cells of one layer it is
  ``d metric(alpha * A_l) / d alpha`` at ``alpha = 1`` (scaling that layer's whole pattern).
- ``integrated=True``: Hao et al.'s attribution, integrated gradients from the zero pattern::

      Attr_l = A_l * integral_0^1 d metric(alpha * A_l) / d A_l  d alpha

  where ``metric(alpha * A_l)`` is the run with layer ``l``'s pattern (all heads) *set* to
  ``alpha`` times its value (``A_l``, the unscaled pattern of the same run; later layers compute
  on the scaled layer's output as usual) and every other layer's pattern left alone. Each layer
  is integrated separately, as in the paper, with ``ig_steps`` points of the shared schedule
  (:func:`fastpatch.attribution.passes.ig_alphas`, from the zero pattern at ``alpha = 0`` to the
  run at ``alpha = 1``): ``alpha = k / ig_steps``, ``k = 1..ig_steps`` (``rule="right"``: Hao et
  al.'s Riemann sum, ``alpha`` in ``(0, 1]``; one step is the non-integrated score) or the
  midpoints ``(k - 0.5) / ig_steps`` (``rule="midpoint"``, error ``O(1 / ig_steps^2)`` instead of
  ``O(1 / ig_steps)``).
  Completeness: summed over one layer's cells it converges to
  ``metric(A) - metric(pattern of layer l set to 0)``. Cost: ``n_layers * ig_steps`` forward +
  backward passes.

Metric conventions as in :mod:`fastpatch.attribution.passes` (``reduce``): ``"scalar"``, a 0-d
metric, and the per-prompt scores are summed over the batch -- so with the batch *mean* of a
per-prompt quantity as the metric the result is the mean over prompts of each prompt's own score
(prompts do not interact in eval mode); ``"none"``, a ``[batch]`` metric, and a trailing
``batch`` axis with one score per prompt.

The per-cell attention-pattern *patching* estimate (clean vs corrupted,
``(pattern_clean - pattern_corrupted) * d metric / d pattern`` at the corrupted run, one value per
``(layer, head, dest, src)``) is
:func:`fastpatch.attribution.nodes.get_attr_patch_attn_head_pattern_dest_src_pos`.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.attribution.passes import (
    Tokens,
    check_inputs,
    check_schedule,
    finish,
    gradients,
    hook_names,
    ig_alphas,
    score_dtype,
)
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn

__all__ = ["ATTENTION_IG_RULES", "get_attention_attribution"]

# "right" as the end-point rule: one step at alpha = 1 is the plain score (passes.RULES)
ATTENTION_IG_RULES = ("right", "midpoint")


def get_attention_attribution(
    model: Any,
    tokens: Tokens,
    metric: MetricFn,
    *,
    integrated: bool = False,
    ig_steps: int = 20,
    rule: str = "right",
    reduce: str = "scalar",
) -> Float[Tensor, "layer head dest src"]:
    """Attention attribution of every pattern cell: ``[n_layers, n_heads, dest, src]``.

    ``pattern * d metric / d pattern`` at the run on ``tokens`` (``integrated=False``), or Hao et
    al.'s integrated version ``pattern * mean_alpha d metric / d pattern`` at the run with that
    layer's pattern scaled to ``alpha * pattern`` (``integrated=True``, ``ig_steps`` values of
    ``alpha`` by ``rule``); see the module docstring. ``reduce='scalar'``: 0-d metric, per-prompt
    scores summed over the batch (the mean per-prompt score for a batch-mean metric);
    ``reduce='none'``: ``[batch]`` metric, result ``[n_layers, n_heads, dest, src, batch]``.
    Query heads (``n_heads``, also on grouped-query models). Cells above the diagonal (masked)
    are 0. The model keeps no hooks and its state.
    """
    operation = "get_attention_attribution()"
    if integrated:
        check_schedule(ig_steps, rule, ATTENTION_IG_RULES)
    check_inputs(model, operation, reduce, tokens=tokens)
    names = hook_names(model, ["pattern"])
    patterns: Dict[str, Tensor] = {}
    with preserved_model_state(model):
        grads = gradients(model, tokens, metric, names, reduce, record=patterns)
        if integrated:
            for name in names:
                pattern = patterns[name]
                total = torch.zeros_like(pattern, dtype=score_dtype(pattern))
                for alpha in ig_alphas(ig_steps, rule):
                    if alpha == 1.0:
                        grad = grads[name]  # the unscaled run, already taken
                    else:
                        grad = gradients(model, tokens, metric, [name], reduce, values={name: alpha * pattern})[name]
                    total += grad.to(total.dtype)
                grads[name] = total / ig_steps
    scores = []
    for name in names:
        dtype = score_dtype(patterns[name])
        scores.append(patterns[name].to(dtype) * grads[name].to(dtype))  # [batch, head, dest, src]
    return finish(torch.stack(scores, dim=1), reduce)
