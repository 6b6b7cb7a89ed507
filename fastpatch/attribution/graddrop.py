"""GradDrop (AtP*, Kramar et al. 2024): attribution patching against cancelling effects.

A node's direct and indirect effects can cancel in the gradient at the corrupted run although they
do not cancel in the actual patch (e.g. because the indirect path saturates), so plain attribution
gives an important node a near-zero estimate. :func:`get_attr_patch_graddrop` takes
``L = n_layers`` extra gradients; the ``l``-th is the gradient of the metric at the corrupted run
with the gradient that flows back through layer ``l``'s residual contribution stopped
(``x.detach()`` on ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out``), and::

    estimate(n) = 1 / (L - 1) * sum_{l=0}^{L-1} (n_clean - n_corrupted) . grad^{(l)}_n

A path from a node in layer ``l_n`` that avoids layer ``l`` survives drop ``l``; the drop of the
node's own layer removes every path, so that term is 0 and the sum averages the ``L - 1`` drops
that can matter. When the node reaches the metric only directly (no later layer in between, e.g.
every node of the last layer) the estimate equals plain attribution.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from jaxtyping import Float
from torch import Tensor

from fastpatch.attribution import passes
from fastpatch.attribution.passes import ALL_SWEEPS, SOURCE_DOC, Tokens
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn

__all__ = ["GRADDROP_SWEEPS", "get_attr_patch_graddrop"]

# Sweeps whose activation lies inside one layer's residual contribution (its attention or MLP
# output and what computes it). resid_pre / resid_mid are residual-stream states, not part of any
# layer's output: no drop removes all their paths, so the 1 / (L - 1) average does not apply.
GRADDROP_SWEEPS = tuple(s for s, (act, _) in ALL_SWEEPS.items() if act not in ("resid_pre", "resid_mid"))


def _stop_gradient(tensor: Tensor, hook: Any) -> Tensor:
    """Identity in the forward, zero gradient in the backward."""
    return tensor.detach()


def get_attr_patch_graddrop(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    sweep: str = "attn_head_out_all_pos", *, reduce: str = "scalar", absolute: bool = False,
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Float[Tensor, "..."]:
    """GradDrop estimate (AtP*, Kramar et al. 2024) of ``get_act_patch_<sweep>`` minus the corrupted baseline.

    For every layer ``l`` of the ``L = n_layers`` layers, the gradient of the metric at the
    corrupted run is taken with the gradient through layer ``l``'s residual contribution dropped
    (a stop-gradient -- ``x.detach()`` -- on ``blocks.{l}.hook_attn_out`` and
    ``blocks.{l}.hook_mlp_out``; the forward is unchanged), and the estimate of a cell is::

        1 / (L - 1) * sum_l sum_cell (a_clean - a_corrupted) * d metric^{(l)} / d a

    Nodes inside layer ``l`` (its heads' ``z``/``q``/``k``/``v``/pattern, its ``attn_out`` and
    ``mlp_out``, its MLP neurons) reach the residual stream only through layer ``l``'s attention or
    MLP output, so dropping their own layer zeroes their gradient (for ``attn_out``/``mlp_out``
    the activation is read *before* the stop-gradient on the same hook point): of the ``L``
    terms one is 0 and ``1 / (L - 1)`` averages the other ``L - 1``. Drops of earlier layers leave
    the gradient unchanged; the drop of a later layer ``l`` keeps exactly the paths that avoid
    ``l``. Hence: a last-layer node's estimate equals plain attribution; a node whose effect is
    split into a direct path and an indirect path through layer ``l`` that cancel in the gradient
    keeps the direct path's share in the drop-``l`` term; and the estimate is additive over the
    slices of one activation (heads sum to ``attn_out``, neurons to ``mlp_out``), like plain
    attribution. ``sweep`` must be one of :data:`GRADDROP_SWEEPS` (every sweep but ``resid_pre``
    and ``resid_mid``, which lie in no layer's contribution). Needs ``n_layers >= 2``.

    ``absolute=True`` takes ``|.|`` of each drop's estimate before the average (per cell, and per
    prompt with ``reduce='none'``): the magnitude form for ranking nodes, in which the drops cannot
    cancel each other either; the AtP* paper estimates magnitudes ``|c(n)|`` and, as we read it,
    averages this form. Default: the signed average above, so that, like every ``get_attr_patch_*``,
    the result estimates the signed ``patched - corrupted`` effect and can be laid beside it.

    Result shaped like ``get_attr_patch_<sweep>`` (trailing ``batch`` axis for ``reduce='none'``).
    Cost: one clean forward and ``L`` corrupted forward+backward passes; the model keeps no hooks.
    """
    if sweep not in GRADDROP_SWEEPS:
        if sweep in ALL_SWEEPS:
            raise ValueError(
                f"GradDrop needs a node inside a layer's residual contribution; {sweep!r} is the residual "
                f"stream itself. Sweeps: {list(GRADDROP_SWEEPS)}"
            )
        raise ValueError(f"unknown sweep {sweep!r}; GradDrop sweeps: {list(GRADDROP_SWEEPS)}")
    runs = passes.resolve_runs(model, "get_attr_patch_graddrop()", reduce, clean_tokens, corrupted_tokens, source, direction)
    n_layers = model.cfg.n_layers
    if n_layers < 2:
        raise ValueError(f"GradDrop averages over n_layers - 1 layer drops and needs at least 2 layers, got {n_layers}")
    names = passes.hook_names(model, [passes.check_sweep(sweep)])
    drop_points = passes.hook_names(model, ["attn_out", "mlp_out"])  # [attn_out 0..L-1, mlp_out 0..L-1]
    total: Optional[Tensor] = None
    with preserved_model_state(model):
        clean = passes.patch_values(model, runs, names)
        corrupted: Dict[str, Tensor] = {}
        delta: Dict[str, Tensor] = {}
        for layer in range(n_layers):
            drops = [(drop_points[layer], _stop_gradient), (drop_points[n_layers + layer], _stop_gradient)]
            # the first drop's forward also records the corrupted activations (its probes change nothing)
            record = corrupted if layer == 0 else None
            grads = passes.gradients(
                model, runs.target, patching_metric, names, reduce, record=record, after_hooks=drops
            )
            if layer == 0:
                delta = {n: passes.difference(clean[n], corrupted[n]) for n in names}
            scores = {n: delta[n] * grads[n].to(delta[n].dtype) for n in names}
            est = passes.finish(passes.layer_stack(model, scores, sweep), reduce)
            if absolute:
                est = est.abs()
            total = est if total is None else total + est
    assert total is not None
    return total / (n_layers - 1)


get_attr_patch_graddrop.__doc__ += SOURCE_DOC
