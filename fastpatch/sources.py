"""Ablation sources: zero, mean and resample caches to patch from, instead of a clean run.

Activation patching moves activations from a *source* into the run being patched. The classic
source is a clean run (``model.run_with_cache(clean_tokens)``); ablation studies patch in a
neutral value instead. Each function here runs the model once on ``tokens`` and returns a
:class:`SourceCache`, a TransformerLens ``ActivationCache`` holding the ablated value of every
activation it caches, which goes wherever a clean cache goes:

- the ``clean_cache`` argument of every exact sweep (``fastpatch.patching.get_act_patch_*``,
  ``generic_activation_patch``, the ``*_every`` helpers) and of direct path patching (the
  source head's write becomes ``ablated z @ W_O - corrupted z @ W_O``);
- ``source=`` of every attribution function that patches (``fastpatch.attribution``: node
  sweeps, integrated gradients, AtP*, GradDrop, the stop-gradient variants, edges), in place of
  the tokens of the run whose activations are patched in, and ``clean_cache`` of ``verify``;
- TransformerLens's own ``patching`` functions, which give the same numbers.

Kinds (``SourceCache.kind``):

- ``"zero"``: every activation 0. Attention scores keep the causal mask (``-inf`` where the
  model's own scores are ``-inf``): a zero score there would let a position attend to later ones.
- ``"mean"``: the batch mean of each activation, at each position (``per_position=True``) or also
  averaged over positions (``False``: one value per feature, the same at every position).
  Attention patterns and scores (``[batch, head, dest, src]``) are always averaged per
  ``(dest, src)``: an average over destinations would not be a causal pattern.
- ``"resample"``: each prompt's activations replaced by another prompt's, ``act[permutation]``
  with a permutation of the batch drawn from ``seed`` (``SourceCache.permutation``).

Direction (:func:`resolve_direction`, shared by exact sweeps and attribution): ``"denoising"``
patches the clean run's activations into the corrupted run, ``"noising"`` the corrupted run's into
the clean run; a source replaces the run whose activations are patched in.

Zero and mean caches hold ``batch`` rows (default: ``tokens``' batch) as a broadcast view, so a
mean over many reference prompts can be patched into a smaller batch at no memory cost.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from fastpatch.engine.checks import check_tokens, position_axes, require_eval_mode

__all__ = [
    "KINDS", "DIRECTIONS", "SourceCache", "zero_ablation", "mean_ablation", "resample_ablation", "resolve_direction"
]

KINDS = ("zero", "mean", "resample")
DIRECTIONS = ("denoising", "noising")
NamesFilter = Union[None, str, list, Callable[[str], bool]]


class SourceCache(ActivationCache):
    """An ``ActivationCache`` of ablated activations, with how it was made.

    ``kind``: one of :data:`KINDS`; ``permutation``: ``[batch]`` the prompt each row was taken
    from (resample only, else ``None``).
    """

    def __init__(self, cache_dict: Dict[str, Tensor], model: Any, kind: str, permutation: Optional[Tensor] = None):
        super().__init__(cache_dict, model)
        self.kind = kind
        self.permutation = permutation

    def __repr__(self) -> str:
        return f"SourceCache(kind={self.kind!r}, {len(self.cache_dict)} activations)"


def _run(model: Any, tokens: Tensor, names_filter: NamesFilter, operation: str) -> Dict[str, Tensor]:
    """Every activation ``names_filter`` selects, from one no-grad forward on ``tokens``."""
    require_eval_mode(model, operation=operation)
    check_tokens(model, tokens, "tokens")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    return dict(cache.items())


def _rows(batch: Optional[int], tokens: Tensor) -> int:
    if batch is None:
        return int(tokens.shape[0])
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer (the rows of the run the cache is patched into), got {batch!r}")
    return batch


def _broadcast(value: Tensor, rows: int) -> Tensor:
    """``[1, ...]`` -> ``[rows, ...]`` view."""
    return value.expand(rows, *value.shape[1:])


def zero_ablation(
    model: Any, tokens: Int[Tensor, "batch pos"], *, batch: Optional[int] = None, names_filter: NamesFilter = None
) -> SourceCache:
    """Zero-ablation source: every activation of a run on ``tokens`` set to 0 (attention scores keep
    their ``-inf`` causal mask). ``batch``: rows of the run it is patched into (default ``tokens``')."""
    rows = _rows(batch, tokens)
    acts = _run(model, tokens, names_filter, "zero_ablation()")
    out = {}
    for name, act in acts.items():
        zero = torch.zeros_like(act[:1])
        if name.endswith("attn_scores"):
            zero = torch.where(torch.isneginf(act[:1]), act[:1], zero)
        out[name] = _broadcast(zero, rows)
    return SourceCache(out, model, "zero")


def mean_ablation(
    model: Any, tokens: Int[Tensor, "batch pos"], *, per_position: bool = True, batch: Optional[int] = None,
    names_filter: NamesFilter = None,
) -> SourceCache:
    """Mean-ablation source: each activation's mean over the prompts of ``tokens`` (at each position,
    or over positions too with ``per_position=False``; see the module docstring for attention).
    ``batch``: rows of the run it is patched into (default ``tokens``'). Means are taken in at
    least float32 and cast back to the activation's dtype."""
    if not isinstance(per_position, bool):
        raise ValueError(f"per_position must be True or False, got {per_position!r}")
    rows = _rows(batch, tokens)
    acts = _run(model, tokens, names_filter, "mean_ablation()")
    out = {}
    for name, act in acts.items():
        axes = (0,) if per_position or position_axes(name) != (1,) or act.ndim < 2 else (0, 1)
        wide = act.to(torch.promote_types(act.dtype, torch.float32))
        out[name] = _broadcast(wide.mean(dim=axes, keepdim=True).expand_as(act[:1]).to(act.dtype), rows)
    return SourceCache(out, model, "mean")


def resample_ablation(
    model: Any, tokens: Int[Tensor, "batch pos"], *, seed: int = 0, names_filter: NamesFilter = None
) -> SourceCache:
    """Resample-ablation source: prompt ``i``'s activations are those of prompt ``permutation[i]``
    of a run on ``tokens``, the permutation drawn from ``seed`` (``torch.randperm`` on a CPU
    generator, so the same on every device). Patch it into a run of the same batch size."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    acts = _run(model, tokens, names_filter, "resample_ablation()")
    permutation = torch.randperm(int(tokens.shape[0]), generator=torch.Generator().manual_seed(seed))
    # activations without a batch axis (shared across prompts, e.g. rotary tables: [1, ...]) stay as they are
    out = {
        name: act[permutation.to(act.device)] if act.shape[:1] == tokens.shape[:1] else act for name, act in acts.items()
    }
    return SourceCache(out, model, "resample", permutation)


class Direction(NamedTuple):
    """The run a patch goes into (``target``, the argument named ``target_name``) and the tokens of
    the run whose activations are patched in (``values``, named ``values_name``; ``None``: a source)."""

    target: Tensor
    values: Optional[Tensor]
    target_name: str
    values_name: str


def resolve_direction(
    clean_tokens: Optional[Tensor], corrupted_tokens: Optional[Tensor], source: Optional[Mapping[str, Tensor]],
    direction: str,
) -> Direction:
    """Which run is patched with what, for ``direction`` (one of :data:`DIRECTIONS`).

    ``"denoising"``: clean activations into the corrupted run (the default everywhere: does the
    clean run's activation here restore the behaviour?). ``"noising"``: corrupted activations into
    the clean run (does losing it here break the behaviour?). ``source`` (a cache) replaces the
    tokens of the run whose activations are patched in, which must then be ``None``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    names = ("corrupted_tokens", "clean_tokens") if direction == "denoising" else ("clean_tokens", "corrupted_tokens")
    target, values = (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)
    if target is None:
        raise ValueError(f"{names[0]} is None: with direction={direction!r} it is the run that is patched")
    if source is not None and values is not None:
        raise ValueError(
            f"give {names[1]} or source=, not both: with direction={direction!r} the activations patched into "
            f"the {names[0].split('_')[0]} run come from {names[1]}'s run, or from source"
        )
    if source is None and values is None:
        raise ValueError(f"{names[1]} is None: give the tokens of the run whose activations are patched in, or source=")
    if source is not None and not isinstance(source, (Mapping, ActivationCache)):
        raise ValueError(f"source must be an activation cache (hook name -> tensor), got {type(source).__name__}")
    return Direction(target, values, *names)
