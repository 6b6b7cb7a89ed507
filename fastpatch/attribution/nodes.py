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

Gradients are read with *zero probes*: a forward hook returns ``activation + probe`` with
``probe = zeros_like(activation, requires_grad=True)``, so the forward is unchanged bit for bit
and ``torch.autograd.grad(metric, probes)`` is the gradient with respect to the activation as the
hook sees it (the canonical ``[batch, pos, head, d_head]`` layout on ``TransformerBridge``'s
converted points, where the hook's input tensor is a view the model never consumes and its
``.grad`` would stay empty). ``torch.autograd.grad`` touches no parameter's ``.grad``.

Metric conventions (``reduce``):

- ``"scalar"`` (default): ``metric(logits)`` returns a 0-d tensor (e.g. the batch mean of a
  per-prompt quantity, like TransformerLens's default); the result is the estimated change of
  that scalar.
- ``"none"``: ``metric(logits)`` returns ``[batch]``; the gradient of its sum is taken (prompts
  do not interact in eval mode, so row ``i`` of the gradient belongs to prompt ``i`` alone) and
  the result has an extra trailing ``batch`` axis with one estimate per prompt.

Not covered: direct path patching (``get_act_patch_direct_path*``), which patches a path rather
than a node.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
import transformer_lens.utilities as tl_utils

from fastpatch.engine.checks import check_tokens, require_eval_mode
from fastpatch.engine.model_state import preserved_model_state

__all__ = [
    "REDUCES",
    "SWEEPS",
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
    "get_attr_patch_attn_head_all_pos_every",
    "get_attr_patch_attn_head_by_pos_every",
    "get_attr_patch_block_every",
]

REDUCES = ("scalar", "none")
MetricFn = Callable[[Tensor], Tensor]


# ---- slice reducers: per-element scores -> one value per cell, batch axis first --------------
def _per_pos(p: Tensor) -> Tensor:
    """``[batch, pos, d_model]`` -> ``[batch, pos]`` (resid_pre, resid_mid, attn_out, mlp_out)."""
    return p.sum(-1)


def _head_by_pos(p: Tensor) -> Tensor:
    """``[batch, pos, head, d_head]`` -> ``[batch, pos, head]``."""
    return p.sum(-1)


def _head_all_pos(p: Tensor) -> Tensor:
    """``[batch, pos, head, d_head]`` -> ``[batch, head]``."""
    return p.sum((1, 3))


def _pattern_dest_src(p: Tensor) -> Tensor:
    """``[batch, head, dest, src]`` unchanged."""
    return p


def _pattern_by_pos(p: Tensor) -> Tensor:
    """``[batch, head, dest, src]`` -> ``[batch, head, dest]`` (a whole destination row of the pattern)."""
    return p.sum(-1)


def _pattern_all_pos(p: Tensor) -> Tensor:
    """``[batch, head, dest, src]`` -> ``[batch, head]``."""
    return p.sum((2, 3))


def _neuron_by_pos(p: Tensor) -> Tensor:
    """``[batch, pos, d_mlp]`` unchanged."""
    return p


# sweep name -> (activation name for ``utils.get_act_name``, reducer). Same activations and cell
# grids as ``transformer_lens.patching.get_act_patch_<name>`` (plus mlp_neuron_by_pos).
SWEEPS: Dict[str, Tuple[str, Callable[[Tensor], Tensor]]] = {
    "resid_pre": ("resid_pre", _per_pos),
    "resid_mid": ("resid_mid", _per_pos),
    "attn_out": ("attn_out", _per_pos),
    "mlp_out": ("mlp_out", _per_pos),
    "attn_head_out_by_pos": ("z", _head_by_pos),
    "attn_head_q_by_pos": ("q", _head_by_pos),
    "attn_head_k_by_pos": ("k", _head_by_pos),
    "attn_head_v_by_pos": ("v", _head_by_pos),
    "attn_head_pattern_by_pos": ("pattern", _pattern_by_pos),
    "attn_head_pattern_dest_src_pos": ("pattern", _pattern_dest_src),
    "attn_head_out_all_pos": ("z", _head_all_pos),
    "attn_head_q_all_pos": ("q", _head_all_pos),
    "attn_head_k_all_pos": ("k", _head_all_pos),
    "attn_head_v_all_pos": ("v", _head_all_pos),
    "attn_head_pattern_all_pos": ("pattern", _pattern_all_pos),
    "mlp_neuron_by_pos": ("post", _neuron_by_pos),
}

_HEAD_ALL_POS = ("attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos")
_HEAD_BY_POS = ("attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos", "attn_head_pattern_by_pos")
_BLOCK = ("resid_pre", "attn_out", "mlp_out")


# ---- validation -------------------------------------------------------------------------------
def _check_inputs(model: Any, clean_tokens: Any, corrupted_tokens: Any, reduce: str, operation: str) -> None:
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES} for attribution patching, got {reduce!r}")
    require_eval_mode(model, operation=operation)
    check_tokens(model, clean_tokens, "clean_tokens")
    check_tokens(model, corrupted_tokens, "corrupted_tokens")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens {tuple(corrupted_tokens.shape)} "
            "must have the same shape: attribution pairs activations prompt by prompt, position by position"
        )
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{operation} needs autograd, but torch.inference_mode() is active")


def _check_input(model: Any, tokens: Any, reduce: str, operation: str, name: str = "tokens") -> None:
    """:func:`_check_inputs` for an analysis of ONE batch of prompts (no clean/corrupted pair)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    require_eval_mode(model, operation=operation)
    check_tokens(model, tokens, name)
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{operation} needs autograd, but torch.inference_mode() is active")


def _check_metric(value: Any, reduce: str, batch: int) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"the patching metric must return a floating-point tensor, got {got}")
    if reduce == "scalar" and value.ndim != 0:
        raise ValueError(
            f"with reduce='scalar' the patching metric must return a 0-d scalar (e.g. the batch mean), "
            f"got shape {tuple(value.shape)}; use reduce='none' for a [batch] metric"
        )
    if reduce == "none" and tuple(value.shape) != (batch,):
        raise ValueError(f"with reduce='none' the patching metric must return [batch]=[{batch}], got shape {tuple(value.shape)}")
    if not value.requires_grad:
        raise ValueError("the patching metric does not depend on the logits (its value carries no gradient)")
    return value if reduce == "scalar" else value.sum()


def _hook_names(model: Any, activations: Sequence[str]) -> List[str]:
    names = []
    for act in dict.fromkeys(activations):
        for layer in range(model.cfg.n_layers):
            name = tl_utils.get_act_name(act, layer)
            if name not in model.hook_dict:
                raise ValueError(
                    f"the model has no hook point {name!r}: this architecture has no {act!r} activation "
                    "(for example resid_mid on parallel attention+MLP blocks)"
                )
            names.append(name)
    return names


# ---- the single pass --------------------------------------------------------------------------
def gradients(
    model: Any,
    tokens: Tensor,
    metric: MetricFn,
    names: Sequence[str],
    reduce: str,
    values: Optional[Dict[str, Tensor]] = None,
    record: Optional[Dict[str, Tensor]] = None,
    after_hooks: Sequence[Tuple[str, Callable]] = (),
) -> Dict[str, Tensor]:
    """``d metric / d act`` at every hook name, from one forward and one ``autograd.grad``.

    Zero probes: each hook returns ``act + zeros(requires_grad)``, so the forward is unchanged and
    the probe's gradient is the activation's. Where ``values`` has a name, the activation is *set*
    to it in the forward with an identity backward (the model's total derivative at that state);
    ``record`` receives each activation as the hook saw it. ``after_hooks`` are extra forward
    hooks registered *after* the probes, so on a hook point they share with a probe they see the
    probed activation (GradDrop's stop-gradients: a probe upstream of a ``detach`` on the same
    point gets a zero gradient).

    Afterwards no autograd graph stays attached to the model (see :func:`_release_graph`).
    """
    values = values or {}
    probes: Dict[str, Tensor] = {}

    def probe(name: str):
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            if record is not None:
                record[name] = tensor.detach().clone()
            if name in values:
                tensor = tensor + (values[name].to(tensor.dtype) - tensor).detach()
            probes[name] = torch.zeros_like(tensor, requires_grad=True)
            return tensor + probes[name]

        return hook

    fwd_hooks = [(n, probe(n)) for n in names] + list(after_hooks)
    try:
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
            logits = model(tokens)
            target = _check_metric(metric(logits), reduce, int(tokens.shape[0]))
            missing = [n for n in names if n not in probes]
            if missing:
                raise ValueError(f"hook points {missing} did not fire during the forward pass")
            grads = torch.autograd.grad(target, [probes[n] for n in names], allow_unused=True)
    finally:
        _release_graph(model)
    return {n: (g if g is not None else torch.zeros_like(probes[n])).detach() for n, g in zip(names, grads)}


def _release_graph(model: Any) -> None:
    """Detach tensors a forward with gradients left on the model's modules.

    ``TransformerBridge``'s attention modules keep the last forward's pattern (``_pattern``); after
    a forward with gradients it is a non-leaf tensor, which holds its autograd graph alive and makes
    ``copy.deepcopy(model)`` fail ("Only Tensors created explicitly by the user ... support the
    deepcopy protocol"). The values are kept; only the graph is dropped, as a no-grad forward
    would leave it.
    """
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, Tensor) and not isinstance(value, torch.nn.Parameter) and value.grad_fn is not None:
                setattr(module, key, value.detach())


def _scores(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: MetricFn, hook_names: Sequence[str], reduce: str
) -> Dict[str, Tensor]:
    """``(clean - corrupted) * d metric / d act`` per element (at least float32), for every hook name.

    One corrupted forward with zero probes, one ``autograd.grad``, one clean forward (no grad).
    """
    clean: Dict[str, Tensor] = {}
    corrupted: Dict[str, Tensor] = {}

    def capture(name: str):
        def hook(tensor: Tensor, hook: Any) -> None:
            clean[name] = tensor.detach().clone()

        return hook

    # The clean forward runs last: TransformerBridge keeps the last forward's attention pattern
    # on its attention modules, and a no-grad one leaves no autograd graph attached to the model.
    with preserved_model_state(model):
        by_name = gradients(model, corrupted_tokens, metric, hook_names, reduce, record=corrupted)
        grads = [by_name[n] for n in hook_names]
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, capture(n)) for n in hook_names]):
            model(clean_tokens)
    out = {}
    for name, grad in zip(hook_names, grads):
        dtype = torch.promote_types(clean[name].dtype, torch.float32)  # float32, or float64 models stay float64
        delta = clean[name].to(dtype) - corrupted[name].to(dtype)
        out[name] = delta * grad.to(dtype) if grad is not None else torch.zeros_like(delta)
    return out


def _finish(values: Tensor, reduce: str) -> Tensor:
    """Internal ``[batch, ...]`` -> ``[...]`` (scalar: summed over prompts) or ``[..., batch]``."""
    return values.sum(0) if reduce == "scalar" else values.movedim(0, -1).contiguous()


def _layer_stack(model: Any, scores: Dict[str, Tensor], sweep: str) -> Tensor:
    """One sweep's cells, batch first: ``[batch, n_layers, *cell]``."""
    act, reducer = SWEEPS[sweep]
    return torch.stack([reducer(scores[tl_utils.get_act_name(act, l)]) for l in range(model.cfg.n_layers)], dim=1)


def _batch_first(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: MetricFn, sweeps: Sequence[str], reduce: str, operation: str
) -> Dict[str, Tensor]:
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise ValueError(f"unknown sweeps {unknown}; known: {sorted(SWEEPS)}")
    _check_inputs(model, clean_tokens, corrupted_tokens, reduce, operation)
    names = _hook_names(model, [SWEEPS[s][0] for s in sweeps])
    scores = _scores(model, clean_tokens, corrupted_tokens, metric, names, reduce)
    return {s: _layer_stack(model, scores, s) for s in sweeps}


def attribute_nodes(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    patching_metric: MetricFn,
    sweeps: Optional[Sequence[str]] = None,
    *,
    reduce: str = "scalar",
) -> Dict[str, Tensor]:
    """Several sweeps (names of :data:`SWEEPS`, default all the model has) from ONE clean forward,
    ONE corrupted forward and ONE backward: ``{sweep: estimate}``, each shaped like
    ``get_attr_patch_<sweep>``'s result."""
    if sweeps is None:
        sweeps = [s for s, (act, _) in SWEEPS.items() if tl_utils.get_act_name(act, 0) in model.hook_dict]
    out = _batch_first(model, clean_tokens, corrupted_tokens, patching_metric, list(sweeps), reduce, "attribute_nodes()")
    return {s: _finish(v, reduce) for s, v in out.items()}


def _named(sweep: str, shape: str) -> Callable[..., Tensor]:
    act = SWEEPS[sweep][0]
    name = f"get_attr_patch_{sweep}"

    def fn(
        model: Any,
        clean_tokens: Int[Tensor, "batch pos"],
        corrupted_tokens: Int[Tensor, "batch pos"],
        patching_metric: MetricFn,
        *,
        reduce: str = "scalar",
    ) -> Float[Tensor, "..."]:
        out = _batch_first(model, clean_tokens, corrupted_tokens, patching_metric, [sweep], reduce, f"{name}()")
        return _finish(out[sweep], reduce)

    exact = "" if sweep == "mlp_neuron_by_pos" else f" of ``fastpatch.patching.get_act_patch_{sweep}``"
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (
        f"First-order estimate{exact} (patched metric minus the corrupted baseline), from one clean "
        f"forward, one corrupted forward and one backward.\n\n"
        f"Patches ``{act}`` (``{tl_utils.get_act_name(act, 0).replace('0', '{layer}', 1)}``). Returns ``{shape}`` "
        "(K/V heads are ``n_key_value_heads`` on grouped-query models), with a trailing ``batch`` "
        "axis for ``reduce='none'``."
    )
    return fn


get_attr_patch_resid_pre = _named("resid_pre", "[n_layers, pos]")
get_attr_patch_resid_mid = _named("resid_mid", "[n_layers, pos]")
get_attr_patch_attn_out = _named("attn_out", "[n_layers, pos]")
get_attr_patch_mlp_out = _named("mlp_out", "[n_layers, pos]")
get_attr_patch_attn_head_out_by_pos = _named("attn_head_out_by_pos", "[n_layers, pos, n_heads]")
get_attr_patch_attn_head_q_by_pos = _named("attn_head_q_by_pos", "[n_layers, pos, n_heads]")
get_attr_patch_attn_head_k_by_pos = _named("attn_head_k_by_pos", "[n_layers, pos, n_kv_heads]")
get_attr_patch_attn_head_v_by_pos = _named("attn_head_v_by_pos", "[n_layers, pos, n_kv_heads]")
get_attr_patch_attn_head_pattern_by_pos = _named("attn_head_pattern_by_pos", "[n_layers, n_heads, dest_pos]")
get_attr_patch_attn_head_pattern_dest_src_pos = _named("attn_head_pattern_dest_src_pos", "[n_layers, n_heads, dest_pos, src_pos]")
get_attr_patch_attn_head_out_all_pos = _named("attn_head_out_all_pos", "[n_layers, n_heads]")
get_attr_patch_attn_head_q_all_pos = _named("attn_head_q_all_pos", "[n_layers, n_heads]")
get_attr_patch_attn_head_k_all_pos = _named("attn_head_k_all_pos", "[n_layers, n_kv_heads]")
get_attr_patch_attn_head_v_all_pos = _named("attn_head_v_all_pos", "[n_layers, n_kv_heads]")
get_attr_patch_attn_head_pattern_all_pos = _named("attn_head_pattern_all_pos", "[n_layers, n_heads]")
get_attr_patch_mlp_neuron_by_pos = _named("mlp_neuron_by_pos", "[n_layers, pos, d_mlp]")


def _pad_heads(t: Tensor, n_heads: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, n_heads - t.size(-1)))


def get_attr_patch_attn_head_all_pos_every(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Float[Tensor, "patch_type layer head"]:
    """out, q, k, v, pattern (all positions) from one pass: ``[5, n_layers, n_heads]``.

    Stacked like ``get_act_patch_attn_head_all_pos_every``: grouped-query K/V zero-padded to
    ``n_heads``. Trailing ``batch`` axis for ``reduce='none'``.
    """
    out = _batch_first(model, clean_tokens, corrupted_tokens, patching_metric, _HEAD_ALL_POS, reduce, "get_attr_patch_attn_head_all_pos_every()")
    n_heads = model.cfg.n_heads
    parts = [_pad_heads(out[s], n_heads) for s in _HEAD_ALL_POS]
    return _finish(torch.stack(parts, dim=1), reduce)


def get_attr_patch_attn_head_by_pos_every(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Float[Tensor, "patch_type layer pos head"]:
    """out, q, k, v, pattern by position from one pass: ``[5, n_layers, pos, n_heads]``.

    Stacked like ``get_act_patch_attn_head_by_pos_every``: the pattern sweep rearranged from
    ``[layer, head, dest_pos]`` to ``[layer, pos, head]``, grouped-query K/V zero-padded.
    """
    out = _batch_first(model, clean_tokens, corrupted_tokens, patching_metric, _HEAD_BY_POS, reduce, "get_attr_patch_attn_head_by_pos_every()")
    n_heads = model.cfg.n_heads
    parts = [_pad_heads(out[s], n_heads) for s in _HEAD_BY_POS[:4]] + [out[_HEAD_BY_POS[4]].transpose(-1, -2)]
    return _finish(torch.stack(parts, dim=1), reduce)


def get_attr_patch_block_every(
    model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: MetricFn, *, reduce: str = "scalar"
) -> Float[Tensor, "patch_type layer pos"]:
    """resid_pre, attn_out, mlp_out by position from one pass: ``[3, n_layers, pos]``."""
    out = _batch_first(model, clean_tokens, corrupted_tokens, patching_metric, _BLOCK, reduce, "get_attr_patch_block_every()")
    return _finish(torch.stack([out[s] for s in _BLOCK], dim=1), reduce)
