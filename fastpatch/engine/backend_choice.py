"""Backend selection: the native backend where it runs a plan exactly, else the hook backend.

``"auto"`` never fails where the hook backend can run: whatever goes wrong while the native model
is built or checked (a feature it refuses, a parity mismatch, an exception from the model's own
weight accessors such as a bridge's ``NotImplementedError`` for multi-head latent attention) makes
the native backend unsupported for that call, with its reason, and the hook backend runs instead.
Each fallback warns once per model and reason, saying what it costs.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional, Set

from torch import Tensor

from fastpatch.engine.native.model import NativeEngine, NativeModel, ParityError, UnsupportedModel

BACKENDS = ("auto", "native", "hooks")

# model -> the kinds of fallback reason already warned about for it (weak: a warning must not keep a model alive)
_WARNED: "weakref.WeakKeyDictionary[Any, Set[str]]" = weakref.WeakKeyDictionary()


def model_name(model: Any) -> str:
    """The architecture a message names: the bridge's Hugging Face class, else the model's class."""
    return str(getattr(model.cfg, "architecture", None) or type(model).__name__)


def _warn_once(model: Any, reason: str) -> None:
    try:
        seen = _WARNED.setdefault(model, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        seen = set()
    key = reason.split(":")[0]  # the kind of failure, not the numbers of this call's tokens
    if key in seen:
        return
    seen.add(key)
    warnings.warn(
        f"native backend unsupported for {model_name(model)}: {reason}; using hooks, expect about TransformerLens speed",
        stacklevel=6,  # the caller of the fastpatch function
    )


def _checked_native(model: Any, tokens: Tensor) -> NativeEngine:
    """``NativeModel.checked``, with any failure other than a refusal or a parity mismatch turned into a refusal."""
    try:
        return NativeModel.checked(model, tokens)
    except (UnsupportedModel, ParityError):
        raise
    except Exception as error:  # noqa: BLE001 - any failure to build or check means "unsupported", with its reason
        raise UnsupportedModel(f"building or checking the native model raised {type(error).__name__}: {error}") from error


def select_backend(model: Any, tokens: Tensor, backend: str, native_unsupported: Optional[str] = None) -> Optional[NativeEngine]:
    """The checked native engine when the native backend runs this plan, ``None`` for the hook backend.

    ``"auto"`` uses the native backend where the model and the plan are supported
    (``native_unsupported`` says why a plan is not) and its parity check passes, else the hook
    backend, warning once per model and reason; ``"native"`` raises instead of falling back, with
    the reason (``UnsupportedModel`` or ``ParityError``, both ``ValueError``s).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hooks":
        return None
    try:
        if native_unsupported is not None:
            raise UnsupportedModel(native_unsupported)
        return _checked_native(model, tokens)
    except (UnsupportedModel, ParityError) as error:
        if backend == "native":
            raise type(error)(f"native backend unsupported for {model_name(model)}: {error}") from error.__cause__
        _warn_once(model, str(error))
        return None
