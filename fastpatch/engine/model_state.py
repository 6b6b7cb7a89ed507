"""Leave a model exactly as the caller handed it over, also when a sweep raises."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

# Bridge-managed flags a sweep may touch (or a caller's hook may flip mid-run).
MODEL_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens")
_FLAG_SETTERS = {flag: f"set_{flag}" for flag in MODEL_FLAGS}


def model_flags(model: Any) -> Dict[str, bool]:
    """The current value of every bridge-managed flag the config has."""
    return {f: bool(getattr(model.cfg, f)) for f in MODEL_FLAGS if hasattr(model.cfg, f)}


def _hook_handles(model: Any) -> List[Tuple[Any, str, List[Any]]]:
    points = getattr(model, "hook_dict", {}) or {}
    seen, out = set(), []
    for point in points.values():
        if id(point) in seen:
            continue
        seen.add(id(point))
        for direction in ("fwd_hooks", "bwd_hooks"):
            out.append((point, direction, list(getattr(point, direction, []))))
    return out


def user_hooks(model: Any) -> List[str]:
    """Names of the hook points that carry hooks of the caller's (``add_hook`` or a plain module hook).

    A bridge registers module hooks of its own on its wrapped components, never on its hook points,
    so any hook found on a hook point is the caller's.
    """
    names = []
    for name, point in (getattr(model, "hook_dict", {}) or {}).items():
        handles = [*getattr(point, "fwd_hooks", []), *getattr(point, "bwd_hooks", [])]
        # except the permanent hooks by which a bridge forwards a symbolic component's hook points (OPT)
        bridge_ids = {getattr(h.hook, "id", None) for h in handles if _bridge_forwarding(h)}
        raw = (getattr(point, "_forward_hooks", {}), getattr(point, "_forward_pre_hooks", {}),
               getattr(point, "_backward_hooks", {}))
        if any(not _bridge_forwarding(h) for h in handles) or any(set(r) - bridge_ids for r in raw):
            names.append(name)
    return names


def _bridge_forwarding(handle: Any) -> bool:
    """A permanent hook the bridge itself adds (``component_setup._wire_symbolic_hooks``)."""
    module = getattr(getattr(handle, "user_hook", None), "__module__", "")
    return bool(getattr(handle, "is_permanent", False)) and module == "transformer_lens.model_bridge.component_setup"


def refuse_user_hooks(model: Any, operation: str, remedy: str = "") -> None:
    """``ValueError`` naming the caller's hooks, when the model carries any.

    A batched run calls a caller's hook on the stacked rows of many cells at once (and the native
    backend does not call it at all), so a metric or an edit that depends on it would be wrong.
    """
    names = user_hooks(model)
    if not names:
        return
    preview = ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")
    raise ValueError(
        f"{operation}: the model carries hooks of its own at {preview}. A batched run would call them on the "
        "stacked rows of many patches at once (the native backend not at all), so a metric or edit that relies "
        "on them would give wrong numbers. Remove them (model.reset_hooks(including_permanent=True))"
        + (f" or {remedy}" if remedy else "") + "."
    )


def hook_count(model: Any) -> int:
    """Number of forward and backward hooks attached anywhere in the model."""
    return sum(len(handles) for _, _, handles in _hook_handles(model))


@contextmanager
def preserved_model_state(model: Any) -> Iterator[None]:
    """Restore the model's flags, hooks and train/eval mode on exit.

    ``run_with_hooks`` already removes the hooks it added; this guard also removes any hook a
    caller's setter or metric attached and undoes flag changes, so a sweep has no side effect.
    """
    flags = model_flags(model)
    before = {(id(p), d): set(map(id, hs)) for p, d, hs in _hook_handles(model)}
    training = getattr(model, "training", False)
    try:
        yield
    finally:
        for point, direction, handles in _hook_handles(model):
            keep = before.get((id(point), direction), set())
            extra = [h for h in handles if id(h) not in keep]
            for handle in extra:
                handle.hook.remove()
            if extra:
                setattr(point, direction, [h for h in handles if id(h) in keep])
        for flag, value in flags.items():
            if bool(getattr(model.cfg, flag)) != value:
                getattr(model, _FLAG_SETTERS[flag])(value)
        if getattr(model, "training", False) != training:
            model.train(training)
