"""Backend selection: the native backend where it runs a plan exactly, else the hook backend."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import Tensor

from fastpatch.engine.native.model import NativeEngine, NativeModel, ParityError, UnsupportedModel

BACKENDS = ("auto", "native", "hooks")


def select_backend(model: Any, tokens: Tensor, backend: str, native_unsupported: Optional[str] = None) -> Optional[NativeEngine]:
    """The checked native engine when the native backend runs this plan, ``None`` for the hook backend.

    ``"auto"`` uses the native backend where the model and the plan are supported
    (``native_unsupported`` says why a plan is not) and its parity check passes, else the hook
    backend (with a warning if parity failed); ``"native"`` raises instead of falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hooks":
        return None
    try:
        if native_unsupported is not None:
            raise UnsupportedModel(native_unsupported)
        return NativeModel.checked(model, tokens)
    except UnsupportedModel:
        if backend == "native":
            raise
        return None
    except ParityError as error:
        if backend == "native":
            raise
        warnings.warn(f"{error}; using the hook backend", stacklevel=5)
        return None
