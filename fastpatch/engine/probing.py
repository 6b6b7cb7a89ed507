"""Hook probing: which hook points a plan patches exist, fire, and what shape their activations have."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

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
