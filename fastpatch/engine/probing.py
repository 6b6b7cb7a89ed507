"""Hook probing: which hook points a plan patches exist, fire, and what shape their activations have."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fastpatch.engine.checks import all_finite, cached_activation, check_cached_activation
from fastpatch.engine.plan import Sweep


def _require_hook_points(model: Any, hook_names: List[str]) -> None:
    for name in hook_names:
        if name not in model.hook_dict:
            raise ValueError(f"the model has no hook point {name!r} to patch")


def _require_fired(hook_names: List[str], shapes: Mapping[str, tuple]) -> None:
    missing = [n for n in hook_names if n not in shapes]
    if missing:
        raise ValueError(f"hook points {missing} did not fire in a forward pass, so they cannot be patched")


def probe_hooks(model: Any, tokens: Tensor, hook_names: List[str]) -> Dict[str, tuple]:
    """Activation shapes (without batch) at each hook a plan patches, from one 1-row forward.

    Also proves each hook fires: a patch at a hook that never fires would silently do nothing.
    """
    _require_hook_points(model, hook_names)
    shapes: Dict[str, tuple] = {}
    fwd_hooks = [(name, lambda act, hook, name=name: shapes.__setitem__(name, tuple(act.shape[1:]))) for name in hook_names]
    with torch.no_grad():
        model.run_with_hooks(tokens[:1], fwd_hooks=fwd_hooks)
    _require_fired(hook_names, shapes)
    return shapes


def clean_activations_for(
    model: Any, tokens: Tensor, clean_cache: Mapping, sweeps: List[Sweep], hook_shapes: Optional[Mapping[str, tuple]] = None
) -> Dict[str, Tensor]:
    """The clean activation of every hook point the sweeps patch, validated against the model.

    ``hook_shapes`` (the shape of every hook point that fired in a full run of the model on
    ``tokens``: ``Trace.hook_shapes`` of the native backend's parity run) stands in for the probe
    forward; ``None`` probes.
    All activations' finiteness is read back in one transfer.
    """
    names = sorted({sweep.hook_name(layer) for sweep in sweeps for layer in set(sweep.indices[:, 0].tolist())})
    activations = {n: cached_activation(clean_cache, n) for n in names}
    if hook_shapes is None:
        shapes = probe_hooks(model, tokens, names)
    else:
        _require_hook_points(model, names)
        _require_fired(names, hook_shapes)
        shapes = {n: hook_shapes[n] for n in names}
    finite = all_finite(list(activations.values()), list(activations))
    for (name, activation), is_finite in zip(activations.items(), finite):
        check_cached_activation(activation, name, tokens, shapes[name], finite=is_finite)
    return activations


def _has_qkv_fork(attn: Any) -> bool:
    """Whether an attention bridge implements TransformerLens's per-head pre-Q/K/V fork."""
    # The bridge classes that implement it; imported here, as the bridge does, for its import cycle.
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    forked = isinstance(attn, (JointQKVAttentionBridge, PositionEmbeddingsAttentionBridge))
    return forked and bool(getattr(attn, "supports_split_qkv_fork", True))


def post_norm_qkv_forks(model: Any, layers: Sequence[int]) -> List[int]:
    """Layers whose Q/K/V fork adds a direct-path write after the block's norm, not before it.

    TransformerLens's fork re-normalises each head's copy of the residual only where the block has
    wired its pre-norm capture (a forward pre-hook on ``ln1``, installed on the first forward);
    BLOOM's block never does, so there the write lands on ``ln1``'s output. The native reader
    always re-normalises ``resid + write``: on these layers it would not give TransformerLens's values.
    """
    return sorted({layer for layer in layers if _has_qkv_fork(getattr(model.blocks[layer], "attn", None))
                   and not getattr(model.blocks[layer], "_capture_hooks_wired", False)})


class NoQKVFork(ValueError, NotImplementedError):
    """A Q/K/V reader whose attention has no per-head input fork. A ``ValueError`` like every bad
    input here, and the ``NotImplementedError`` TransformerLens raises for the same model."""


def require_qkv_input_forks(model: Any, layers: Sequence[int], component: str) -> None:
    """Refuse, from the model's structure alone (before any forward), hook-based Q/K/V direct paths
    into ``layers`` whose attention class has no per-head pre-Q/K/V fork.

    There ``blocks.{l}.attn.hook_{component}_input`` never fires, so a hook patch would do nothing;
    TransformerLens refuses such models when it turns ``use_split_qkv_input`` on, by the same rule
    (``TransformerBridge._validate_attention_fork_supported``), but only after its forwards began.
    The native backend needs no fork and computes these paths.
    """
    for layer in layers:
        attn = getattr(model.blocks[layer], "attn", None)
        name = f"blocks.{layer}.attn.hook_{component}_input"
        if not _has_qkv_fork(attn) or name not in model.hook_dict:
            raise NoQKVFork(
                f"blocks.{layer}.attn ({type(attn).__name__}) has no per-head pre-Q/K/V fork, so {name} would "
                "never fire and a hook-based direct path patch there would do nothing (TransformerLens refuses "
                "this model too); the native backend (backend='native') computes these paths"
            )
