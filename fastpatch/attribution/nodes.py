"""Node attribution patching: a first-order Taylor estimate of every activation-patching sweep.

For a patch that moves an activation ``a`` from its corrupted value to its clean value on a
slice ``S`` (one layer, position, head, ...), activation patching measures
``metric(corrupted with a[S] <- a_clean[S]) - metric(corrupted)``. Attribution patching
(Nanda, "Attribution Patching", 2023; TransformerLens ``attribution_patch``) replaces it by its
linearisation at the corrupted run::

    estimate[S] = sum over S of (a_clean - a_corrupted) * d metric / d a   (at the corrupted run)

which every sweep's cells get from the same three passes: one clean forward (activations only),
one corrupted forward with gradients, and ONE backward for the whole batch. Each
``get_attr_patch_<X>`` mirrors ``fastpatch.patching.get_act_patch_<X>``: same activation, same
slices, same result shape (``[n_layers, pos]`` for resid_pre, ``[n_layers, n_kv_heads]`` for K/V
on grouped-query models, ``[n_layers, n_heads, dest, src]`` for the pattern by dest/src, ...).

Gradients are read with zero probes (:func:`fastpatch.attribution.passes.gradients`), which leave
the forward unchanged bit for bit. Metric conventions (``reduce``): see
:mod:`fastpatch.attribution.passes`.

Not covered: direct path patching (``get_act_patch_direct_path*``), which patches a path rather
than a node.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import transformer_lens.utilities as tl_utils
from torch import Tensor

from fastpatch.attribution.passes import (
    ALL_SWEEPS,
    REDUCES,
    SCORE_SWEEPS,
    SOURCE_DOC,
    SWEEPS,
    Runs,
    Tokens,
    check_sweep,
    estimates,
    finish,
    gradients,
    hook_names,
    layer_stack,
    model_sweeps,
    named_estimator,
    patch_values,
    resolve_runs,
)
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.engine.sweep_groups import BLOCK, HEAD_ALL_POS, HEAD_BY_POS, stack_head_sweeps
from fastpatch.metrics import MetricFn

__all__ = [
    "REDUCES",
    "SWEEPS",
    "SCORE_SWEEPS",
    "attribute_nodes",
    "get_attr_patch_resid_pre",
    "get_attr_patch_resid_mid",
    "get_attr_patch_attn_out",
    "get_attr_patch_mlp_out",
    "get_attr_patch_attn_head_out_by_pos",
    "get_attr_patch_attn_head_q_by_pos",
    "get_attr_patch_attn_head_k_by_pos",
    "get_attr_patch_attn_head_v_by_pos",
    "get_attr_patch_attn_head_pattern_by_pos",
    "get_attr_patch_attn_head_pattern_dest_src_pos",
    "get_attr_patch_attn_head_out_all_pos",
    "get_attr_patch_attn_head_q_all_pos",
    "get_attr_patch_attn_head_k_all_pos",
    "get_attr_patch_attn_head_v_all_pos",
    "get_attr_patch_attn_head_pattern_all_pos",
    "get_attr_patch_mlp_neuron_by_pos",
    "get_attr_patch_attn_head_scores_by_pos",
    "get_attr_patch_attn_head_scores_dest_src_pos",
    "get_attr_patch_attn_head_scores_all_pos",
    "get_attr_patch_attn_head_all_pos_every",
    "get_attr_patch_attn_head_by_pos_every",
    "get_attr_patch_block_every",
]


def _scores(model: Any, runs: Runs, metric: MetricFn, names: Sequence[str], reduce: str) -> Dict[str, Tensor]:
    """``(clean - corrupted) * d metric / d act`` per element (at least float32), for every hook name.

    One corrupted forward with zero probes, one ``autograd.grad``, one clean forward (no grad; none
    with a ``source``). "Clean" and "corrupted" stand for ``runs``' patched-in and patched runs.
    """
    corrupted: Dict[str, Tensor] = {}
    # The clean forward runs last: TransformerBridge keeps the last forward's attention pattern
    # on its attention modules, and a no-grad one leaves no autograd graph attached to the model.
    with preserved_model_state(model):
        grads = gradients(model, runs.target, metric, names, reduce, record=corrupted)
        clean = patch_values(model, runs, names)
    return estimates(names, clean, corrupted, grads)


def _batch_first(model: Any, runs: Runs, metric: MetricFn, sweeps: Sequence[str], reduce: str) -> Dict[str, Tensor]:
    """``{sweep: [batch, n_layers, *cell]}`` for several sweeps from one set of passes."""
    unknown = [s for s in sweeps if s not in ALL_SWEEPS]
    if unknown:
        raise ValueError(f"unknown sweeps {unknown}; known: {sorted(SWEEPS) + sorted(SCORE_SWEEPS)}")
    names = hook_names(model, [check_sweep(s) for s in sweeps])
    scores = _scores(model, runs, metric, names, reduce)
    return {s: layer_stack(model, scores, s) for s in sweeps}


def attribute_nodes(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    sweeps: Optional[Sequence[str]] = None, *, reduce: str = "scalar",
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Dict[str, Tensor]:
    """Several sweeps (names of :data:`SWEEPS`, default all the model has) from ONE clean forward,
    ONE corrupted forward and ONE backward: ``{sweep: estimate}``, each shaped like
    ``get_attr_patch_<sweep>``'s result."""
    if sweeps is None:
        sweeps = model_sweeps(model)
    runs = resolve_runs(model, "attribute_nodes()", reduce, clean_tokens, corrupted_tokens, source, direction)
    out = _batch_first(model, runs, patching_metric, list(sweeps), reduce)
    return {s: finish(v, reduce) for s, v in out.items()}


attribute_nodes.__doc__ += SOURCE_DOC


def _named(
    name: str, doc: str, shape: str, sweeps: Sequence[str], combine: Callable[[Any, Dict[str, Tensor]], Tensor]
) -> Callable[..., Tensor]:
    """A public ``get_attr_patch_*`` function: ``sweeps`` from one set of passes, ``combine``d
    (``(model, {sweep: [batch, n_layers, *cell]}) -> [batch, ...]``), then finished per ``reduce``."""

    def run(model: Any, runs: Runs, metric: MetricFn, reduce: str) -> Tensor:
        return finish(combine(model, _batch_first(model, runs, metric, sweeps, reduce)), reduce)

    return named_estimator(name, doc, run, shape)


def _sweep(sweep: str, shape: str) -> Callable[..., Tensor]:
    act = check_sweep(sweep)
    exact = "" if sweep == "mlp_neuron_by_pos" else f" of ``fastpatch.patching.get_act_patch_{sweep}``"
    doc = (
        f"First-order estimate{exact} (patched metric minus the corrupted baseline), from one clean "
        f"forward, one corrupted forward and one backward.\n\n"
        f"Patches ``{act}`` (``{tl_utils.get_act_name(act, 0).replace('0', '{layer}', 1)}``). Returns ``{shape}`` "
        "(K/V heads are ``n_key_value_heads`` on grouped-query models), with a trailing ``batch`` "
        "axis for ``reduce='none'``."
    )
    return _named(f"get_attr_patch_{sweep}", doc, shape, [sweep], lambda model, out: out[sweep])


get_attr_patch_resid_pre = _sweep("resid_pre", "[n_layers, pos]")
get_attr_patch_resid_mid = _sweep("resid_mid", "[n_layers, pos]")
get_attr_patch_attn_out = _sweep("attn_out", "[n_layers, pos]")
get_attr_patch_mlp_out = _sweep("mlp_out", "[n_layers, pos]")
get_attr_patch_attn_head_out_by_pos = _sweep("attn_head_out_by_pos", "[n_layers, pos, n_heads]")
get_attr_patch_attn_head_q_by_pos = _sweep("attn_head_q_by_pos", "[n_layers, pos, n_heads]")
get_attr_patch_attn_head_k_by_pos = _sweep("attn_head_k_by_pos", "[n_layers, pos, n_kv_heads]")
get_attr_patch_attn_head_v_by_pos = _sweep("attn_head_v_by_pos", "[n_layers, pos, n_kv_heads]")
get_attr_patch_attn_head_pattern_by_pos = _sweep("attn_head_pattern_by_pos", "[n_layers, n_heads, dest_pos]")
get_attr_patch_attn_head_pattern_dest_src_pos = _sweep("attn_head_pattern_dest_src_pos", "[n_layers, n_heads, dest_pos, src_pos]")
get_attr_patch_attn_head_out_all_pos = _sweep("attn_head_out_all_pos", "[n_layers, n_heads]")
get_attr_patch_attn_head_q_all_pos = _sweep("attn_head_q_all_pos", "[n_layers, n_heads]")
get_attr_patch_attn_head_k_all_pos = _sweep("attn_head_k_all_pos", "[n_layers, n_kv_heads]")
get_attr_patch_attn_head_v_all_pos = _sweep("attn_head_v_all_pos", "[n_layers, n_kv_heads]")
get_attr_patch_attn_head_pattern_all_pos = _sweep("attn_head_pattern_all_pos", "[n_layers, n_heads]")
get_attr_patch_mlp_neuron_by_pos = _sweep("mlp_neuron_by_pos", "[n_layers, pos, d_mlp]")
# attention scores (pre-softmax; the causal mask's -inf is no change): cells as for the pattern
get_attr_patch_attn_head_scores_by_pos = _sweep("attn_head_scores_by_pos", "[n_layers, n_heads, dest_pos]")
get_attr_patch_attn_head_scores_dest_src_pos = _sweep(
    "attn_head_scores_dest_src_pos", "[n_layers, n_heads, dest_pos, src_pos]"
)
get_attr_patch_attn_head_scores_all_pos = _sweep("attn_head_scores_all_pos", "[n_layers, n_heads]")

# The ``*_every`` groups stack like ``fastpatch.patching.get_act_patch_*_every`` (batch first here,
# so the patch-type axis goes at dim 1).
get_attr_patch_attn_head_all_pos_every = _named(
    "get_attr_patch_attn_head_all_pos_every",
    """out, q, k, v, pattern (all positions) from one pass: ``[5, n_layers, n_heads]``.

    Stacked like ``get_act_patch_attn_head_all_pos_every``: grouped-query K/V zero-padded to
    ``n_heads``. Trailing ``batch`` axis for ``reduce='none'``.
    """,
    "[patch_type, n_layers, n_heads]",
    HEAD_ALL_POS,
    lambda model, out: stack_head_sweeps([out[s] for s in HEAD_ALL_POS], model.cfg.n_heads, by_pos=False, dim=1),
)
get_attr_patch_attn_head_by_pos_every = _named(
    "get_attr_patch_attn_head_by_pos_every",
    """out, q, k, v, pattern by position from one pass: ``[5, n_layers, pos, n_heads]``.

    Stacked like ``get_act_patch_attn_head_by_pos_every``: the pattern sweep rearranged from
    ``[layer, head, dest_pos]`` to ``[layer, pos, head]``, grouped-query K/V zero-padded.
    """,
    "[patch_type, n_layers, pos, n_heads]",
    HEAD_BY_POS,
    lambda model, out: stack_head_sweeps([out[s] for s in HEAD_BY_POS], model.cfg.n_heads, by_pos=True, dim=1),
)
get_attr_patch_block_every = _named(
    "get_attr_patch_block_every",
    "resid_pre, attn_out, mlp_out by position from one pass: ``[3, n_layers, pos]``.",
    "[patch_type, n_layers, pos]",
    BLOCK,
    lambda model, out: torch.stack([out[s] for s in BLOCK], dim=1),
)
