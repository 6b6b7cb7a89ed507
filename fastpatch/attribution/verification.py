"""Exact verification of an estimate's top cells: :func:`verify`.

The top-``k`` cells of any attribution estimate are measured exactly with
:func:`fastpatch.patching.generic_activation_patch` (``index_df`` mode, one batched call) and laid
beside the estimate.
"""

from __future__ import annotations

from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch import patching
from fastpatch.attribution.passes import DIRECTIONS, Tokens, exact_sweep
from fastpatch.metrics import MetricFn

__all__ = ["verify"]


def verify(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], clean_cache: Any,
    patching_metric: MetricFn, estimate: Float[Tensor, "..."], sweep: str, k: int = 10, *,
    direction: str = "denoising", **patch_kwargs: Any,
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

    ``clean_cache``: the activations patched in, the cache of the clean run, or an ablation source
    (:mod:`fastpatch.sources`, the estimate's ``source=``). ``direction`` as the estimate's:
    ``"denoising"`` patches them into ``corrupted_tokens``' run; ``"noising"`` into ``clean_tokens``'
    run, and ``clean_cache`` is then the corrupted run's cache (or the source). The other token
    argument is only checked against the patched run's shape and may be ``None``.
    """
    if sweep == "mlp_neuron_by_pos":
        raise ValueError("verify() needs an exact sweep in fastpatch.patching; mlp_neuron_by_pos has none")
    act, setter, axes = exact_sweep(sweep)
    estimate = torch.as_tensor(estimate)
    if estimate.ndim != len(axes):
        raise ValueError(
            f"estimate has shape {tuple(estimate.shape)}, but sweep {sweep!r} has axes {axes}: pass a "
            "reduce='scalar' result (no trailing batch axis)"
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    target, other = (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)
    if target is None:
        which = "corrupted_tokens" if direction == "denoising" else "clean_tokens"
        raise ValueError(f"{which} is None: with direction={direction!r} it is the run that is patched")
    if other is not None and tuple(clean_tokens.shape) != tuple(corrupted_tokens.shape):
        raise ValueError("clean_tokens and corrupted_tokens must have the same shape")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    flat = estimate.detach().reshape(-1).cpu()
    k = min(int(k), flat.numel())
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    cells = torch.unravel_index(order, tuple(estimate.shape))
    index_df = pd.DataFrame({a: c.tolist() for a, c in zip(axes, cells)})
    patch_kwargs.setdefault("progress", False)
    result = patching.generic_activation_patch(
        model, target, clean_cache, patching_metric, setter, act, index_df=index_df, baseline=True, **patch_kwargs
    )
    exact = (result.values - result.baseline).detach().float().cpu()
    out = index_df.copy()
    out["estimate"] = flat[order].float().numpy()
    out["exact"] = exact.numpy()
    out["abs_error"] = (out["estimate"] - out["exact"]).abs()
    return out
