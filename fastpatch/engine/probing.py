"""Hook probing: which hook points a plan patches exist, fire, and what shape their activations have."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
from torch import Tensor

from fastpatch.engine.checks import cached_activation, check_cached_activation
from fastpatch.engine.plan import Sweep


def probe_hooks(model: Any, tokens: Tensor, hook_names: List[str]) -> Dict[str, tuple]:
    """Activation shapes (without batch) at each hook a plan patches, from one 1-row forward.

    Also proves each hook fires: a patch at a hook that never fires would silently do nothing.
    """
    shapes: Dict[str, tuple] = {}
    fwd_hooks = []
    for name in hook_names:
        if name not in model.hook_dict:
            raise ValueError(f"the model has no hook point {name!r} to patch")
        fwd_hooks.append((name, lambda act, hook, name=name: shapes.__setitem__(name, tuple(act.shape[1:]))))
    with torch.no_grad():
        model.run_with_hooks(tokens[:1], fwd_hooks=fwd_hooks)
    missing = [n for n in hook_names if n not in shapes]
    if missing:
        raise ValueError(f"hook points {missing} did not fire in a forward pass, so they cannot be patched")
    return shapes


def clean_activations_for(model: Any, tokens: Tensor, clean_cache: Mapping, sweeps: List[Sweep]) -> Dict[str, Tensor]:
    """The clean activation of every hook point the sweeps patch, validated against the model."""
    names = sorted({sweep.hook_name(layer) for sweep in sweeps for layer in set(sweep.indices[:, 0].tolist())})
    activations = {n: cached_activation(clean_cache, n) for n in names}
    shapes = probe_hooks(model, tokens, names)
    for name, activation in activations.items():
        check_cached_activation(activation, name, tokens, shapes[name])
    return activations
