"""Validation of a sweep's inputs. Every refusal is a ``ValueError`` that names the problem."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import pandas as pd
import torch

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def require_eval_mode(model: Any, *, operation: str) -> None:
    """Refuse a model with any submodule in training mode (dropout would change every number).

    Same rule and message as TransformerLens's own check, which walks the bridge and the wrapped
    source model (``original_model`` is not a registered submodule).
    """
    training = []
    for prefix, root in (("", model), ("original_model", getattr(model, "original_model", None))):
        if not isinstance(root, torch.nn.Module):
            continue
        for name, module in root.named_modules():
            if module.training:
                training.append(".".join(p for p in (prefix, name) if p) or "<root>")
    if training:
        preview = ", ".join(training[:3]) + (f", and {len(training) - 3} more" if len(training) > 3 else "")
        raise ValueError(
            f"{operation} requires the model and all submodules to be in evaluation mode; "
            f"found training mode at {preview}. Call model.eval() before running the analysis."
        )


def check_tokens(model: Any, tokens: Any, name: str = "corrupted_tokens") -> None:
    """Tokens must be a 2-D ``[batch, pos]`` integer tensor of in-vocabulary ids."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D [batch, pos] tensor, got shape {tuple(tokens.shape)}"
            + ("; add a batch axis with tokens[None]" if tokens.ndim == 1 else "")
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab is not None:
        low, high = torch.stack([tokens.min(), tokens.max()]).tolist()  # one host read
        if low < 0 or high >= d_vocab:
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {d_vocab}): min {low}, max {high}")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"{name} has {tokens.shape[1]} positions, more than the model's n_ctx={n_ctx}")


def cached_activation(cache: Mapping[str, torch.Tensor], hook_name: str, what: str = "clean_cache") -> torch.Tensor:
    """``cache[hook_name]`` with an error that says what is missing instead of a bare KeyError."""
    try:
        return cache[hook_name]
    except KeyError:
        raise ValueError(
            f"{what} has no activation {hook_name!r}: it was not cached, or this architecture has "
            "no such hook (for example resid_mid on parallel attention+MLP blocks)"
        ) from None


def position_axes(hook_name: str) -> Tuple[int, ...]:
    """The position axes of an activation: ``(dest, src)`` = ``(2, 3)`` for attention patterns and
    scores (``[batch, head, dest, src]``), else ``(1,)`` (``[batch, pos, ...]``)."""
    return (2, 3) if ("pattern" in hook_name or "attn_scores" in hook_name) else (1,)


def _valid(tensor: torch.Tensor, hook_name: Optional[str]) -> torch.Tensor:
    """0-d bool: every value finite; attention scores may also hold -inf, the causal mask
    (softmax weight 0, as the model's own scores carry it). NaN and +inf are never valid."""
    ok = torch.isfinite(tensor)
    if hook_name is not None and hook_name.endswith("attn_scores"):
        ok |= torch.isneginf(tensor)
    return ok.all()


def all_finite(tensors: List[torch.Tensor], hook_names: Optional[List[str]] = None) -> List[bool]:
    """Whether each tensor holds only finite values (non-float tensors: ``True``), in one host read.

    ``hook_names`` (one per tensor): attention scores among them may hold -inf (:func:`_valid`)."""
    names = hook_names if hook_names is not None else [None] * len(tensors)
    floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]
    out = [True] * len(tensors)
    if floats:
        device = tensors[floats[0]].device
        flags = torch.stack([_valid(tensors[i], names[i]).to(device) for i in floats]).tolist()
        for i, flag in zip(floats, flags):
            out[i] = bool(flag)
    return out


def check_cached_activation(
    activation: torch.Tensor, hook_name: str, tokens: torch.Tensor, expected_tail: Optional[tuple] = None,
    finite: Optional[bool] = None, what: str = "clean_cache",
) -> None:
    """A cached activation must come from a run on the same batch and positions (and model shape).

    ``finite``: whether it holds only finite values, when the caller has read that already
    (:func:`all_finite`, one read for many activations); ``None`` reads it here. Attention scores
    may hold -inf (the causal mask), never NaN. ``what``: the argument's name in messages."""
    batch, pos = tokens.shape
    if activation.shape[0] not in (1, batch):
        raise ValueError(
            f"{what}[{hook_name!r}] has batch size {activation.shape[0]}, the corrupted tokens "
            f"have {batch}: the clean run must use prompts paired one to one with the corrupted ones"
        )
    for axis in position_axes(hook_name):
        if activation.ndim <= axis or activation.shape[axis] != pos:
            raise ValueError(
                f"{what}[{hook_name!r}] has shape {tuple(activation.shape)}, which does not match "
                f"the corrupted tokens' {pos} positions: the clean cache comes from a different "
                "sequence length"
            )
    if expected_tail is not None and tuple(activation.shape[1:]) != tuple(expected_tail):
        raise ValueError(
            f"{what}[{hook_name!r}] has shape {tuple(activation.shape)}, expected "
            f"[batch, {', '.join(map(str, expected_tail))}]: the clean cache comes from a different model"
        )
    if finite is None:
        finite = not activation.is_floating_point() or bool(_valid(activation, hook_name))
    if not finite:
        masked = " (-inf is allowed in attention scores: the causal mask)" if hook_name.endswith("attn_scores") else ""
        raise ValueError(f"{what}[{hook_name!r}] contains NaN or infinite values{masked}")


def check_index_df(index_df: pd.DataFrame, axis_limits: Mapping[str, int]) -> None:
    """Every entry of an ``index_df`` must be a non-negative integer within its axis's range.

    Columns with no known range (a custom setter's own axes) are only checked to be integers.
    """
    if not isinstance(index_df, pd.DataFrame):
        raise ValueError(f"index_df must be a pandas DataFrame, got {type(index_df).__name__}")
    if len(index_df) == 0:
        raise ValueError("index_df has no rows: there is nothing to patch")
    if len(index_df.columns) == 0 or index_df.columns[0] != "layer":
        raise ValueError(f"index_df's first column must be 'layer', got {list(index_df.columns)}")
    for column in index_df.columns:
        values = index_df[column]
        if not pd.api.types.is_integer_dtype(values):
            raise ValueError(f"index_df column {column!r} must hold integers, got dtype {values.dtype}")
        low, high = int(values.min()), int(values.max())
        limit = axis_limits.get(column)
        if low < 0 or (limit is not None and high >= limit):
            bound = f"[0, {limit})" if limit is not None else "non-negative"
            raise ValueError(
                f"index_df column {column!r} is out of range: values span [{low}, {high}], allowed {bound}"
            )


def check_metric_output(out: torch.Tensor, name: str, per_example: bool, batch: int, reduce: str) -> None:
    """Same shape rules and messages as ``transformer_lens.patching.generic_activation_patch``."""
    if per_example:
        if out.ndim != 1 or out.shape[0] != batch:
            raise ValueError(
                f"patching_metric {name!r} must return a [batch] tensor of length {batch} under "
                f"reduce={reduce!r}, got shape {tuple(out.shape)}"
            )
    elif out.ndim != 0:
        raise ValueError(
            f"patching_metric {name!r} must return a scalar under reduce='scalar', got shape "
            f"{tuple(out.shape)}; return a [batch] tensor and pass reduce='mean' or reduce='none' "
            "to keep per-example values"
        )

