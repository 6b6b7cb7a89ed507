"""Refinements of node attribution patching: integrated gradients, AtP*'s QK fix, exact verification.

Built on :mod:`fastpatch.attribution.nodes` (same sweep names, cell grids, result shapes,
``reduce`` conventions and zero-probe gradients).

- :func:`get_attr_patch_ig`: integrated gradients. Instead of the gradient at the corrupted run,
  the gradient is averaged over ``ig_steps`` points of the straight path from the corrupted to
  the clean activation. What is interpolated (exactly):

  * default (``cell=None``): EVERY site of the sweep at once -- the sweep's activation at every
    layer, all positions and heads -- is *set* to ``corrupted + alpha * (clean - corrupted)``,
    both taken from the unpatched clean and corrupted runs (so a site's value ignores the
    interpolation upstream of it). The backward treats that setting as the identity
    (straight-through), so a site's gradient is the model's ordinary total derivative at the
    interpolated state, including the paths through later sites -- exactly the gradient
    ``nodes.py`` takes, only evaluated at ``alpha`` instead of ``0``. This is the usual
    EAP-IG / "ig-activations" approximation: cell ``c``'s estimate is
    ``delta_c . mean_alpha grad_c(alpha)`` where at ``alpha`` all cells, not only ``c``, are
    part-way patched. Cost: one clean forward, one corrupted forward, and ``ig_steps``
    forward+backward passes (independent of the number of cells).
  * ``cell=(layer, ...)`` (an index of the exact sweep, as in its ``index_df``): only that cell's
    slice is interpolated (the exact sweep's own patch setter defines the slice) and only that
    cell's estimate is returned. Then the estimate is a quadrature of
    ``integral_0^1 d metric(alpha) / d alpha`` along the exact patch's own path, so it converges
    to the exact patch effect (fundamental theorem of calculus); the midpoint rule's error is
    ``O(1 / ig_steps^2)`` for a smooth metric.

  ``alpha`` takes the midpoints ``(k + 0.5) / ig_steps`` (``rule="midpoint"``, default) or the
  left points ``k / ig_steps`` (``rule="left"``). With ``ig_steps=1`` the midpoint rule is the
  first-order estimate with the gradient taken at the *half-patched* run (``alpha = 0.5``, every
  site halfway between corrupted and clean); ``rule="left"`` with ``ig_steps=1`` is ``alpha = 0``
  and reproduces ``get_attr_patch_<sweep>`` (plain attribution) exactly.

- :func:`get_attr_patch_attn_head_q_all_pos_atpstar` and the ``k``/``by_pos`` variants: the QK
  fix of AtP* (Kramar et al., 2024, "AtP*: An efficient and scalable method for localizing LLM
  behaviour to components"). A query/key patch acts on the metric only through the attention
  pattern of its head, and a saturated softmax has a vanishing gradient, so plain attribution
  misses patches that move the argmax. Here the patched pattern is recomputed *exactly*
  (``softmax`` of the attention scores with the clean ``q`` -- or ``k`` -- of that head, at the
  patched positions, and the corrupted scores elsewhere), and only the step from the pattern to
  the metric is linearised::

      estimate = sum (pattern_patched - pattern_corrupted) * d metric / d pattern   (at corrupted)

  Scores are read at ``hook_attn_scores`` (masked, pre-softmax) of a corrupted forward in which
  one layer's ``hook_q``/``hook_k`` is replaced by the clean one (one extra forward per layer),
  so rotary embeddings, scaling and grouped-query sharing are whatever the model does. On a
  grouped-query model a K/V head's estimate sums the query heads that share it.

- :func:`get_attr_patch_graddrop`: GradDrop, AtP*'s other fix (same paper), against
  *cancellation*: a node's direct and indirect effects can cancel in the gradient at the
  corrupted run although they do not cancel in the actual patch (e.g. because the indirect path
  saturates), so plain attribution gives an important node a near-zero estimate. GradDrop takes
  ``L = n_layers`` extra gradients; the ``l``-th is the gradient of the metric at the corrupted
  run with the gradient that flows back through layer ``l``'s residual contribution stopped
  (``x.detach()`` on ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out``), and::

      estimate(n) = 1 / (L - 1) * sum_{l=0}^{L-1} (n_clean - n_corrupted) . grad^{(l)}_n

  A path from a node in layer ``l_n`` that avoids layer ``l`` survives drop ``l``; the drop of
  the node's own layer removes every path, so that term is 0 and the sum averages the ``L - 1``
  drops that can matter. When the node reaches the metric only directly (no later layer in
  between, e.g. every node of the last layer) the estimate equals plain attribution.

- :func:`verify`: measure the top-``k`` cells of any estimate exactly with
  :func:`fastpatch.patching.generic_activation_patch` (``index_df`` mode) and put estimate and
  exact effect side by side.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pandas as pd
import torch
import transformer_lens.utilities as tl_utils
from jaxtyping import Float, Int
from torch import Tensor

from fastpatch import patching as _patching
from fastpatch.attribution.nodes import (
    SWEEPS,
    MetricFn,
    _check_inputs,
    _finish,
    _hook_names,
    _layer_stack,
    gradients,
)
from fastpatch.engine.model_state import preserved_model_state

__all__ = [
    "IG_RULES",
    "get_attr_patch_ig",
    "get_attr_patch_attn_head_q_all_pos_atpstar",
    "get_attr_patch_attn_head_k_all_pos_atpstar",
    "get_attr_patch_attn_head_q_by_pos_atpstar",
    "get_attr_patch_attn_head_k_by_pos_atpstar",
    "GRADDROP_SWEEPS",
    "get_attr_patch_graddrop",
    "verify",
]

IG_RULES = ("midpoint", "left")


def _neuron_setter(corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor) -> Tensor:
    """One MLP neuron at one position: ``index = (layer, pos, neuron)`` on ``[batch, pos, d_mlp]``."""
    _, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def _exact_sweep(sweep: str) -> Tuple[str, Callable, Tuple[str, ...]]:
    """(activation name, patch setter, index axis names) of ``fastpatch.patching.get_act_patch_<sweep>``."""
    if sweep == "mlp_neuron_by_pos":
        return "post", _neuron_setter, ("layer", "pos", "neuron")
    fn = getattr(_patching, f"get_act_patch_{sweep}", None)
    if fn is None or sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {sorted(SWEEPS)}")
    kw = fn.keywords
    return kw["activation_name"], kw["patch_setter"], tuple(kw["index_axis_names"])


def _dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ---- passes -------------------------------------------------------------------------------------
def _capture(model: Any, tokens: Tensor, names: Sequence[str], fwd_hooks: Sequence = ()) -> Dict[str, Tensor]:
    """Activations at ``names`` of one no-grad forward (optionally with extra editing hooks)."""
    store: Dict[str, Tensor] = {}

    def capture(name: str):
        def hook(tensor: Tensor, hook: Any) -> None:
            store[name] = tensor.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks) + [(n, capture(n)) for n in names]):
        model(tokens)
    missing = [n for n in names if n not in store]
    if missing:
        raise ValueError(f"hook points {missing} did not fire during the forward pass")
    return store


def get_attr_patch_ig(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    patching_metric: MetricFn,
    sweep: str,
    ig_steps: int = 8,
    *,
    reduce: str = "scalar",
    rule: str = "midpoint",
    cell: Optional[Sequence[int]] = None,
) -> Tensor:
    """Integrated-gradients estimate of ``get_act_patch_<sweep>`` minus the corrupted baseline.

    ``sweep`` is a name of :data:`fastpatch.attribution.nodes.SWEEPS`. Without ``cell`` every
    site of the sweep is interpolated at once and the result is shaped like
    ``get_attr_patch_<sweep>``; with ``cell`` (an index of the exact sweep, layer first) only that
    cell is interpolated and its estimate is returned (0-d, or ``[batch]`` for ``reduce='none'``),
    which converges to the exact patch effect as ``ig_steps`` grows. See the module docstring for
    what exactly is interpolated and what ``ig_steps=1`` equals.
    """
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {sorted(SWEEPS)}")
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    if rule not in IG_RULES:
        raise ValueError(f"rule must be one of {IG_RULES}, got {rule!r}")
    _check_inputs(model, clean_tokens, corrupted_tokens, reduce, "get_attr_patch_ig()")
    act = SWEEPS[sweep][0]
    names = _hook_names(model, [act])
    if cell is not None:
        cell = tuple(int(i) for i in cell)
        if not 0 <= cell[0] < model.cfg.n_layers:
            raise ValueError(f"cell {cell}: layer out of range for {model.cfg.n_layers} layers")
        names = [tl_utils.get_act_name(act, cell[0])]
    with preserved_model_state(model):
        clean = _capture(model, clean_tokens, names)
        corrupted = _capture(model, corrupted_tokens, names)
        delta = {n: clean[n].to(_dtype(clean[n])) - corrupted[n].to(_dtype(clean[n])) for n in names}
        if cell is not None:
            (n,) = names
            setter = _exact_sweep(sweep)[1]
            mask = setter(torch.zeros_like(delta[n]), cell, torch.ones_like(delta[n]))
            delta[n] = delta[n] * mask
        total = {n: torch.zeros_like(delta[n]) for n in names}
        for k in range(ig_steps):
            alpha = (k + 0.5) / ig_steps if rule == "midpoint" else k / ig_steps
            values = {n: corrupted[n].to(delta[n].dtype) + alpha * delta[n] for n in names}
            grads = gradients(model, corrupted_tokens, patching_metric, names, reduce, values)
            for n in names:
                total[n] += grads[n].to(total[n].dtype)
    scores = {n: delta[n] * (total[n] / ig_steps) for n in names}
    if cell is not None:
        return _finish(scores[names[0]].flatten(1).sum(1), reduce)
    return _finish(_layer_stack(model, scores, sweep), reduce)


# ---- 2. AtP* QK fix ------------------------------------------------------------------------------
def _atpstar(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: MetricFn, which: str, by_pos: bool, reduce: str, operation: str
) -> Tensor:
    _check_inputs(model, clean_tokens, corrupted_tokens, reduce, operation)
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    pattern_names = _hook_names(model, ["pattern"])
    score_names = _hook_names(model, ["attn_scores"])
    qk_names = _hook_names(model, [which])
    per_layer = []
    with preserved_model_state(model):
        grads = gradients(model, corrupted_tokens, metric, pattern_names, reduce)
        clean_qk = _capture(model, clean_tokens, qk_names)
        corrupted_scores = _capture(model, corrupted_tokens, score_names)
        for layer in range(n_layers):
            qk_name, score_name = qk_names[layer], score_names[layer]
            patched = clean_qk[qk_name]

            def swap(tensor: Tensor, hook: Any, patched: Tensor = patched) -> Tensor:
                return patched.to(tensor.dtype)

            hybrid = _capture(model, corrupted_tokens, [score_name], fwd_hooks=[(qk_name, swap)])[score_name]
            dtype = _dtype(hybrid)
            s_corr = corrupted_scores[score_name].to(dtype)  # [batch, head, dest, src], masked
            s_hyb = hybrid.to(dtype)
            grad = grads[pattern_names[layer]].to(dtype)
            p_corr = s_corr.softmax(-1)
            if not by_pos:
                est = ((s_hyb.softmax(-1) - p_corr) * grad).sum((2, 3))  # [batch, head]
            elif which == "q":
                # patching q at position p changes destination row p only
                est = ((s_hyb.softmax(-1) - p_corr) * grad).sum(-1).transpose(1, 2)  # [batch, pos, head]
            else:
                # patching k at position p changes source column p of every row
                n_pos = s_corr.shape[-1]
                cols = []
                for p in range(n_pos):
                    s = s_corr.clone()
                    s[..., p] = s_hyb[..., p]
                    cols.append(((s.softmax(-1) - p_corr) * grad).sum((2, 3)))
                est = torch.stack(cols, dim=1)  # [batch, pos, head]
            if which == "k" and n_kv != n_heads:
                est = est.unflatten(-1, (n_kv, n_heads // n_kv)).sum(-1)
            per_layer.append(est)
    return _finish(torch.stack(per_layer, dim=1), reduce)


def get_attr_patch_attn_head_q_all_pos_atpstar(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Tensor:
    """AtP* (QK-fixed) estimate of ``get_act_patch_attn_head_q_all_pos``: ``[n_layers, n_heads]``."""
    return _atpstar(model, clean_tokens, corrupted_tokens, patching_metric, "q", False, reduce, "get_attr_patch_attn_head_q_all_pos_atpstar()")


def get_attr_patch_attn_head_k_all_pos_atpstar(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Tensor:
    """AtP* (QK-fixed) estimate of ``get_act_patch_attn_head_k_all_pos``: ``[n_layers, n_kv_heads]``."""
    return _atpstar(model, clean_tokens, corrupted_tokens, patching_metric, "k", False, reduce, "get_attr_patch_attn_head_k_all_pos_atpstar()")


def get_attr_patch_attn_head_q_by_pos_atpstar(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Tensor:
    """AtP* (QK-fixed) estimate of ``get_act_patch_attn_head_q_by_pos``: ``[n_layers, pos, n_heads]``."""
    return _atpstar(model, clean_tokens, corrupted_tokens, patching_metric, "q", True, reduce, "get_attr_patch_attn_head_q_by_pos_atpstar()")


def get_attr_patch_attn_head_k_by_pos_atpstar(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Tensor:
    """AtP* (QK-fixed) estimate of ``get_act_patch_attn_head_k_by_pos``: ``[n_layers, pos, n_kv_heads]``."""
    return _atpstar(model, clean_tokens, corrupted_tokens, patching_metric, "k", True, reduce, "get_attr_patch_attn_head_k_by_pos_atpstar()")


# ---- 3. GradDrop (AtP*) ---------------------------------------------------------------------------
# Sweeps whose activation lies inside one layer's residual contribution (its attention or MLP
# output and what computes it). resid_pre / resid_mid are residual-stream states, not part of any
# layer's output: no drop removes all their paths, so the 1 / (L - 1) average does not apply.
GRADDROP_SWEEPS = tuple(s for s, (act, _) in SWEEPS.items() if act not in ("resid_pre", "resid_mid"))


def _stop_gradient(tensor: Tensor, hook: Any) -> Tensor:
    """Identity in the forward, zero gradient in the backward."""
    return tensor.detach()


def get_attr_patch_graddrop(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    patching_metric: MetricFn,
    sweep: str = "attn_head_out_all_pos",
    *,
    reduce: str = "scalar",
    absolute: bool = False,
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
        if sweep in SWEEPS:
            raise ValueError(
                f"GradDrop needs a node inside a layer's residual contribution; {sweep!r} is the residual "
                f"stream itself. Sweeps: {list(GRADDROP_SWEEPS)}"
            )
        raise ValueError(f"unknown sweep {sweep!r}; GradDrop sweeps: {list(GRADDROP_SWEEPS)}")
    _check_inputs(model, clean_tokens, corrupted_tokens, reduce, "get_attr_patch_graddrop()")
    n_layers = model.cfg.n_layers
    if n_layers < 2:
        raise ValueError(f"GradDrop averages over n_layers - 1 layer drops and needs at least 2 layers, got {n_layers}")
    names = _hook_names(model, [SWEEPS[sweep][0]])
    drop_points = _hook_names(model, ["attn_out", "mlp_out"])  # [attn_out 0..L-1, mlp_out 0..L-1]
    total: Optional[Tensor] = None
    with preserved_model_state(model):
        clean = _capture(model, clean_tokens, names)
        corrupted: Dict[str, Tensor] = {}
        delta: Dict[str, Tensor] = {}
        for layer in range(n_layers):
            drops = [(drop_points[layer], _stop_gradient), (drop_points[n_layers + layer], _stop_gradient)]
            grads = gradients(
                model, corrupted_tokens, patching_metric, names, reduce, record=corrupted if layer == 0 else None, after_hooks=drops
            )
            if layer == 0:
                delta = {n: clean[n].to(_dtype(clean[n])) - corrupted[n].to(_dtype(clean[n])) for n in names}
            scores = {n: delta[n] * grads[n].to(delta[n].dtype) for n in names}
            est = _finish(_layer_stack(model, scores, sweep), reduce)
            if absolute:
                est = est.abs()
            total = est if total is None else total + est
    assert total is not None
    return total / (n_layers - 1)


# ---- 4. exact verification of the top cells --------------------------------------------------------
def verify(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: MetricFn,
    estimate: Tensor,
    sweep: str,
    k: int = 10,
    **patch_kwargs: Any,
) -> pd.DataFrame:
    """Measure the top-``k`` cells (by ``|estimate|``) of an attribution sweep exactly.

    ``estimate`` is a scalar-metric sweep result shaped like ``get_act_patch_<sweep>``'s grid
    (e.g. from ``get_attr_patch_<sweep>``, :func:`get_attr_patch_ig` or an AtP* function).
    The cells run in one batched :func:`fastpatch.patching.generic_activation_patch` call with
    ``index_df`` and the activation name and patch setter of ``get_act_patch_<sweep>``
    (``patch_kwargs`` go to it, e.g. ``backend``, ``chunk_size``).

    Returns a DataFrame, one row per cell in decreasing ``|estimate|`` (ties by flat index): the
    index axes of the exact sweep (``layer``, ``pos``, ``head``...), ``estimate``, ``exact``
    (patched metric minus the corrupted baseline) and ``abs_error``.
    """
    if sweep == "mlp_neuron_by_pos":
        raise ValueError("verify() needs an exact sweep in fastpatch.patching; mlp_neuron_by_pos has none")
    act, setter, axes = _exact_sweep(sweep)
    estimate = torch.as_tensor(estimate)
    if estimate.ndim != len(axes):
        raise ValueError(
            f"estimate has shape {tuple(estimate.shape)}, but sweep {sweep!r} has axes {axes}: pass a "
            "reduce='scalar' result (no trailing batch axis)"
        )
    if tuple(clean_tokens.shape) != tuple(corrupted_tokens.shape):
        raise ValueError("clean_tokens and corrupted_tokens must have the same shape")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    flat = estimate.detach().reshape(-1).cpu()
    k = min(int(k), flat.numel())
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    cells = torch.unravel_index(order, tuple(estimate.shape))
    index_df = pd.DataFrame({a: c.tolist() for a, c in zip(axes, cells)})
    patch_kwargs.setdefault("progress", False)
    result = _patching.generic_activation_patch(
        model, corrupted_tokens, clean_cache, patching_metric, setter, act, index_df=index_df, baseline=True, **patch_kwargs
    )
    exact = (result.values - result.baseline).detach().float().cpu()
    out = index_df.copy()
    out["estimate"] = flat[order].float().numpy()
    out["exact"] = exact.numpy()
    out["abs_error"] = (out["estimate"] - out["exact"]).abs()
    return out
