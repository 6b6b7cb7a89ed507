"""Integrated gradients for node attribution patching: :func:`get_attr_patch_ig`.

Same sweep names, cell grids, result shapes and ``reduce`` conventions as
:mod:`fastpatch.attribution.nodes`. Instead of the gradient at the corrupted run, the gradient is
averaged over ``ig_steps`` points of the straight path from the corrupted to the clean activation.
What is interpolated (exactly):

* default (``cell=None``): EVERY site of the sweep at once -- the sweep's activation at every
  layer, all positions and heads -- is *set* to ``corrupted + alpha * (clean - corrupted)``, both
  taken from the unpatched clean and corrupted runs (so a site's value ignores the interpolation
  upstream of it). The backward treats that setting as the identity (straight-through), so a
  site's gradient is the model's ordinary total derivative at the interpolated state, including
  the paths through later sites -- exactly the gradient ``nodes.py`` takes, only evaluated at
  ``alpha`` instead of ``0``. This is the usual EAP-IG / "ig-activations" approximation: cell
  ``c``'s estimate is ``delta_c . mean_alpha grad_c(alpha)`` where at ``alpha`` all cells, not
  only ``c``, are part-way patched. Cost: one clean forward, one corrupted forward, and
  ``ig_steps`` forward+backward passes (independent of the number of cells).
* ``cell=(layer, ...)`` (an index of the exact sweep, as in its ``index_df``): only that cell's
  slice is interpolated (the exact sweep's own patch setter defines the slice) and only that
  cell's estimate is returned. Then the estimate is a quadrature of
  ``integral_0^1 d metric(alpha) / d alpha`` along the exact patch's own path, so it converges to
  the exact patch effect (fundamental theorem of calculus); the midpoint rule's error is
  ``O(1 / ig_steps^2)`` for a smooth metric.

``alpha`` takes the points of ``rule`` (:data:`IG_RULES`; the schedule is
:func:`fastpatch.attribution.passes.ig_alphas`): the midpoints ``(k + 0.5) / ig_steps``
(``"midpoint"``, default) or the left points ``k / ig_steps`` (``"left"``). With ``ig_steps=1``
the midpoint rule is the first-order estimate with the gradient taken at the *half-patched* run
(``alpha = 0.5``, every site halfway between corrupted and clean); ``rule="left"`` with
``ig_steps=1`` is ``alpha = 0`` and reproduces ``get_attr_patch_<sweep>`` (plain attribution)
exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import transformer_lens.utilities as tl_utils
from jaxtyping import Float
from torch import Tensor

from fastpatch.attribution.passes import (
    SOURCE_DOC,
    Tokens,
    capture,
    check_schedule,
    check_sweep,
    difference,
    exact_sweep,
    finish,
    gradients,
    hook_names,
    ig_alphas,
    layer_stack,
    patch_values,
    resolve_runs,
)
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn

__all__ = ["IG_RULES", "get_attr_patch_ig"]

# "left" as the end-point rule: one step at alpha = 0 is plain attribution (passes.RULES)
IG_RULES = ("midpoint", "left")


def get_attr_patch_ig(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    sweep: str, ig_steps: int = 8,
    *, reduce: str = "scalar", rule: str = "midpoint", cell: Optional[Sequence[int]] = None,
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Float[Tensor, "..."]:
    """Integrated-gradients estimate of ``get_act_patch_<sweep>`` minus the corrupted baseline.

    ``sweep`` is a name of :data:`fastpatch.attribution.nodes.SWEEPS`. Without ``cell`` every
    site of the sweep is interpolated at once and the result is shaped like
    ``get_attr_patch_<sweep>``; with ``cell`` (an index of the exact sweep, layer first) only that
    cell is interpolated and its estimate is returned (0-d, or ``[batch]`` for ``reduce='none'``),
    which converges to the exact patch effect as ``ig_steps`` grows. See the module docstring for
    what exactly is interpolated and what ``ig_steps=1`` equals.
    """
    act = check_sweep(sweep)
    check_schedule(ig_steps, rule, IG_RULES)
    runs = resolve_runs(model, "get_attr_patch_ig()", reduce, clean_tokens, corrupted_tokens, source, direction)
    names = hook_names(model, [act])
    if cell is not None:
        cell = tuple(int(i) for i in cell)
        if not 0 <= cell[0] < model.cfg.n_layers:
            raise ValueError(f"cell {cell}: layer out of range for {model.cfg.n_layers} layers")
        names = [tl_utils.get_act_name(act, cell[0])]
    with preserved_model_state(model):
        clean = patch_values(model, runs, names)
        corrupted = capture(model, runs.target, names)
        delta = {n: difference(clean[n], corrupted[n]) for n in names}
        if cell is not None:
            (n,) = names
            setter = exact_sweep(sweep)[1]
            delta[n] = delta[n] * setter(torch.zeros_like(delta[n]), cell, torch.ones_like(delta[n]))
        total = {n: torch.zeros_like(delta[n]) for n in names}
        for alpha in ig_alphas(ig_steps, rule):
            values = {n: corrupted[n].to(delta[n].dtype) + alpha * delta[n] for n in names}
            grads = gradients(model, runs.target, patching_metric, names, reduce, values)
            for n in names:
                total[n] += grads[n].to(total[n].dtype)
    scores = {n: delta[n] * (total[n] / ig_steps) for n in names}
    if cell is not None:
        return finish(scores[names[0]].flatten(1).sum(1), reduce)
    return finish(layer_stack(model, scores, sweep), reduce)


get_attr_patch_ig.__doc__ += SOURCE_DOC
