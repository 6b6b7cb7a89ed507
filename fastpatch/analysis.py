"""Effects, rankings and summaries of sweep results: what a researcher reads off a sweep.

Every function takes the plain tensors (or ``PatchingResult``) that the sweeps return, so they work
on fastpatch's and TransformerLens's results alike.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.patching import PatchingResult

Values = Union[Tensor, PatchingResult]


def _tensor(values: Values) -> Tensor:
    if isinstance(values, PatchingResult):
        return values.mean()
    if not isinstance(values, Tensor):
        raise ValueError(f"expected a tensor or PatchingResult, got {type(values).__name__}")
    return values


def normalized_effect(
    patched: Values, clean_value: Union[float, Tensor], corrupted_value: Union[float, Tensor]
) -> Float[Tensor, "..."]:
    """``(patched - corrupted) / (clean - corrupted)``: 0 = the patch did nothing, 1 = it restored
    the clean run. Raises when clean and corrupted coincide (the normalisation is undefined)."""
    patched = _tensor(patched)
    clean = torch.as_tensor(clean_value, dtype=patched.dtype, device=patched.device)
    corrupted = torch.as_tensor(corrupted_value, dtype=patched.dtype, device=patched.device)
    gap = clean - corrupted
    if bool((gap == 0).any()):
        raise ValueError(
            "clean and corrupted metric values coincide, so the normalised effect is undefined: the "
            "corruption does not change the metric (check the prompt pair and the metric)"
        )
    return (patched - corrupted) / gap


def top_k(values: Values, axis_names: Sequence[str], k: int = 10, *, by_magnitude: bool = True,
          labels: Optional[dict] = None) -> pd.DataFrame:
    """The ``k`` largest cells as a table: one column per axis, then ``value``, best first.

    ``by_magnitude`` ranks by ``|value|`` (effects can be negative); ``labels`` maps an axis name to
    a sequence of labels for its indices (e.g. ``{"pos": token_strings}``), added as ``<axis>_label``.
    """
    tensor = _tensor(values).detach().float().cpu()
    if tensor.ndim != len(axis_names):
        raise ValueError(f"values have {tensor.ndim} axes but {len(axis_names)} axis names were given: {list(axis_names)}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    flat = tensor.reshape(-1)
    order = torch.argsort(flat.abs() if by_magnitude else flat, descending=True)[:k]
    rows = []
    for i in order.tolist():
        index = torch.unravel_index(torch.tensor(i), tensor.shape)
        row = {name: int(j) for name, j in zip(axis_names, index)}
        for name, names in (labels or {}).items():
            if name in row:
                row[f"{name}_label"] = names[row[name]]
        row["value"] = float(flat[i])
        rows.append(row)
    return pd.DataFrame(rows)


def find_important_heads(values: Values, threshold: float, *, by_magnitude: bool = True) -> pd.DataFrame:
    """Heads of a ``[n_layers, n_heads]`` result whose value (or ``|value|``) is at least ``threshold``,
    strongest first."""
    tensor = _tensor(values)
    if tensor.ndim != 2:
        raise ValueError(f"expected a [n_layers, n_heads] result, got shape {tuple(tensor.shape)}")
    table = top_k(tensor, ("layer", "head"), k=tensor.numel(), by_magnitude=by_magnitude)
    score = table["value"].abs() if by_magnitude else table["value"]
    return table[score >= threshold].reset_index(drop=True)
