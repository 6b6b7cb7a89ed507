"""AtP*'s QK fix: query/key attribution through the exact softmax.

:func:`get_attr_patch_attn_head_q_all_pos_atpstar` and the ``k``/``by_pos`` variants (Kramar et
al., 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to components").
A query/key patch acts on the metric only through the attention pattern of its head, and a
saturated softmax has a vanishing gradient, so plain attribution misses patches that move the
argmax. Here the patched pattern is recomputed *exactly* (``softmax`` of the attention scores with
the clean ``q`` -- or ``k`` -- of that head, at the patched positions, and the corrupted scores
elsewhere), and only the step from the pattern to the metric is linearised::

    estimate = sum (pattern_patched - pattern_corrupted) * d metric / d pattern   (at corrupted)

Scores are read at ``hook_attn_scores`` (masked, pre-softmax) of a corrupted forward in which one
layer's ``hook_q``/``hook_k`` is replaced by the clean one (one extra forward per layer), so rotary
embeddings, scaling and grouped-query sharing are whatever the model does. On a grouped-query
model a K/V head's estimate sums the query heads that share it. Result shapes and ``reduce`` as in
:mod:`fastpatch.attribution.nodes`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.attribution.passes import (
    Runs,
    capture,
    finish,
    gradients,
    hook_names,
    named_estimator,
    patch_values,
    score_dtype,
)
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn

__all__ = [
    "get_attr_patch_attn_head_q_all_pos_atpstar",
    "get_attr_patch_attn_head_k_all_pos_atpstar",
    "get_attr_patch_attn_head_q_by_pos_atpstar",
    "get_attr_patch_attn_head_k_by_pos_atpstar",
]


def _layer_estimate(
    s_corr: Float[Tensor, "batch head dest src"],
    s_hyb: Float[Tensor, "batch head dest src"],
    grad: Float[Tensor, "batch head dest src"],
    which: str,
    by_pos: bool,
) -> Tensor:
    """One layer's estimate from its corrupted and hybrid (clean ``which``) scores: ``[batch, head]``
    (all positions) or ``[batch, pos, head]`` (by position), per query head."""
    p_corr = s_corr.softmax(-1)
    if not by_pos:
        return ((s_hyb.softmax(-1) - p_corr) * grad).sum((2, 3))
    if which == "q":
        # patching q at position p changes destination row p only
        return ((s_hyb.softmax(-1) - p_corr) * grad).sum(-1).transpose(1, 2)
    # patching k at position p changes source column p of every row
    cols = []
    for p in range(s_corr.shape[-1]):
        s = s_corr.clone()
        s[..., p] = s_hyb[..., p]
        cols.append(((s.softmax(-1) - p_corr) * grad).sum((2, 3)))
    return torch.stack(cols, dim=1)


def _atpstar(model: Any, runs: Runs, metric: MetricFn, which: str, by_pos: bool, reduce: str) -> Tensor:
    cfg = model.cfg
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    pattern_names = hook_names(model, ["pattern"])
    score_names = hook_names(model, ["attn_scores"])
    qk_names = hook_names(model, [which])
    per_layer = []
    with preserved_model_state(model):
        grads = gradients(model, runs.target, metric, pattern_names, reduce)
        clean_qk = patch_values(model, runs, qk_names)
        corrupted_scores = capture(model, runs.target, score_names)
        for layer in range(cfg.n_layers):
            qk_name, score_name = qk_names[layer], score_names[layer]

            def swap(tensor: Tensor, hook: Any, patched: Tensor = clean_qk[qk_name]) -> Tensor:
                return patched.to(tensor.dtype).expand_as(tensor)

            hybrid = capture(model, runs.target, [score_name], fwd_hooks=[(qk_name, swap)])[score_name]
            dtype = score_dtype(hybrid)
            s_corr = corrupted_scores[score_name].to(dtype)  # [batch, head, dest, src], masked
            est = _layer_estimate(s_corr, hybrid.to(dtype), grads[pattern_names[layer]].to(dtype), which, by_pos)
            if which == "k" and n_kv != n_heads:
                est = est.unflatten(-1, (n_kv, n_heads // n_kv)).sum(-1)
            per_layer.append(est)
    return finish(torch.stack(per_layer, dim=1), reduce)


def _named(which: str, by_pos: bool, shape: str) -> Callable[..., Tensor]:
    positions = "by_pos" if by_pos else "all_pos"
    return named_estimator(
        f"get_attr_patch_attn_head_{which}_{positions}_atpstar",
        f"AtP* (QK-fixed) estimate of ``get_act_patch_attn_head_{which}_{positions}``: ``{shape}``.",
        lambda model, runs, metric, reduce: _atpstar(model, runs, metric, which, by_pos, reduce),
        shape,
    )


get_attr_patch_attn_head_q_all_pos_atpstar = _named("q", False, "[n_layers, n_heads]")
get_attr_patch_attn_head_k_all_pos_atpstar = _named("k", False, "[n_layers, n_kv_heads]")
get_attr_patch_attn_head_q_by_pos_atpstar = _named("q", True, "[n_layers, pos, n_heads]")
get_attr_patch_attn_head_k_by_pos_atpstar = _named("k", True, "[n_layers, pos, n_kv_heads]")
