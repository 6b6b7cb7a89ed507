"""Where each patched cell enters the model, and the residual stream it enters with.

A cell's patched activation is built exactly as TransformerLens builds it: the patch setter is
applied to the corrupted run's activation (``[batch, ...]``, hook layout). Everything the patch
cannot change is then skipped:

- positions before ``start``, the first position where the patched activation differs from the
  corrupted one (causal attention: nothing before it can change, in any layer). A cell whose
  patch changes nothing at all (e.g. a position where clean and corrupted prompts agree) is a
  no-op: its value is the corrupted baseline;
- every block before the patched one, and inside it whatever precedes the patch: a head's
  q/k/v/pattern/z patch recomputes only that layer's attention from the cached activations.

| activation | enters at | residual it enters with |
|---|---|---|
| resid_pre[l] | attention of block l | the patched residual |
| resid_mid[l] | block l+1 | resid_mid + MLP(patched resid_mid) (*) |
| attn_out[l] | MLP of block l (parallel blocks: block l+1) | resid_pre + patched attn_out (+ mlp_out) |
| z[l] | as attn_out | attn_out recomputed from patched z |
| q/k/v/pattern[l] | as attn_out | attention of block l recomputed with the patch |
| attn_scores[l] | as attn_out | as pattern, the pattern being the softmax of the patched scores |
| mlp_out[l] | block l+1 | resid_mid + patched mlp_out |

(*) In TransformerLens 4.3 bridges ``hook_resid_mid`` is an alias of ``ln2.hook_in``: a patch there
changes the MLP's input but not the residual stream's skip path. We reproduce that, since the
values must be TransformerLens's.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastpatch.engine.native.model import NativeModel, Trace

SUPPORTED_ACTIVATIONS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "attn_scores")

# Entry stages within a block: before its attention, or before its MLP (sequential blocks).
ATTN, MLP = 0, 1


class Entry(NamedTuple):
    """Where a cell's rows join the forward: before ``stage`` (ATTN or MLP) of ``block``."""

    block: int
    stage: int


class NativeCell(NamedTuple):
    """A plan cell as the native backend runs it: its number in the plan and its entry point."""

    cell: int
    block: int
    stage: int


def _trace_activation(native: NativeModel, trace: Trace, name: str, layer: int) -> Tensor:
    if name == "resid_mid" and native.parallel:
        raise ValueError("parallel attention+MLP blocks have no resid_mid")
    if name == "attn_scores":
        return corrupted_scores(native, trace, layer)
    return getattr(trace, name)[layer]


def corrupted_scores(native: NativeModel, trace: Trace, layer: int) -> Float[Tensor, "batch head dest src"]:
    """The corrupted run's pre-softmax scores of ``layer`` (``hook_attn_scores``, -inf where masked), computed
    from its queries and keys on first use and kept in the trace: only score patches need them."""
    if layer not in trace.attn_scores:
        trace.attn_scores[layer] = native.scores(native.rotate_q(layer, trace.q[layer], 0), trace.k_rot[layer], 0, layer)
    return trace.attn_scores[layer]


def entry_point(native: NativeModel, activation_name: str, layer: int) -> Entry:
    """Where a patch of ``activation_name`` at ``layer`` first changes the residual."""
    if activation_name == "resid_pre":
        return Entry(layer, ATTN)
    if activation_name in ("mlp_out", "resid_mid") or native.parallel:
        return Entry(layer + 1, ATTN)
    return Entry(layer, MLP)


def _patched(native: NativeModel, trace: Trace, activation_name: str, index: list, patch_setter: Callable, clean: Tensor) -> Tuple[Tensor, Tensor]:
    corrupted = _trace_activation(native, trace, activation_name, index[0])
    return patch_setter(corrupted.clone(), index, clean), corrupted


def changed_positions(
    native: NativeModel, trace: Trace, activation_name: str, index: list, patch_setter: Callable, clean: Tensor
) -> Bool[Tensor, "pos"]:
    """Which (query) positions the cell's patch changes, on the activations' device.

    Kept on the device so that a whole plan's cells are read back to the host in one transfer
    (:func:`first_changed_positions`), not one synchronisation per cell."""
    patched, corrupted = _patched(native, trace, activation_name, index, patch_setter, clean)
    pos_axis = 2 if activation_name in ("pattern", "attn_scores") else 1
    return (patched != corrupted).movedim(pos_axis, 0).reshape(patched.shape[pos_axis], -1).any(dim=1)


def first_changed_positions(changed: Bool[Tensor, "cells pos"]) -> List[Optional[int]]:
    """Each cell's first changed position (``None``: its patch changes nothing), one host transfer."""
    changed = changed.cpu()
    first = changed.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
    return [int(f) if any_ else None for f, any_ in zip(first.tolist(), changed.any(dim=1).tolist())]


# What a cell records of the layer it patches: ``record(layer, kind, value)`` (see ``cell_resid``).
LayerRecord = Optional[Callable[[int, str, Tensor], None]]


def cell_resid(
    native: NativeModel,
    trace: Trace,
    activation_name: str,
    index: list,
    patch_setter: Callable,
    clean: Tensor,
    start: int,
    record: LayerRecord = None,
) -> Tensor:
    """The residual ``[batch, pos - start, d_model]`` the cell's rows enter the model with (see the table).

    ``record(layer, kind, value)``, when given, receives the hooks of the patched layer that the patch
    changes and that come before the entry point, at positions ``start..`` in the hook layouts (the
    kinds of ``backend.forward_from_entries``' record, and ``post`` for ``mlp.hook_post``): the patched
    activation itself and what the layer computes from it, e.g. for a z patch ``z``, ``attn_out`` and
    ``resid_mid`` (or ``resid_post`` in a parallel block). Hooks upstream of the patch are unchanged:
    the corrupted run's. A resid_pre patch records nothing here: its rows enter before the layer.
    """
    layer = index[0]
    keep = (lambda kind, value: None) if record is None else (lambda kind, value: record(layer, kind, value))
    patched, _ = _patched(native, trace, activation_name, index, patch_setter, clean)
    if activation_name == "resid_pre":
        return patched[:, start:]
    if activation_name == "resid_mid":  # the bridge's hook_resid_mid is ln2.hook_in: the MLP input only
        keep("resid_mid", patched[:, start:])
        mlp_out = native.mlp(layer, patched[:, start:], None if record is None else lambda post: keep("post", post))
        keep("mlp_out", mlp_out)
        return _kept(keep, "resid_post", trace.resid_mid[layer][:, start:] + mlp_out)
    if activation_name == "mlp_out":
        keep("mlp_out", patched[:, start:])
        if native.parallel:
            return _kept(keep, "resid_post", trace.resid_pre[layer][:, start:] + trace.attn_out[layer][:, start:] + patched[:, start:])
        return _kept(keep, "resid_post", trace.resid_mid[layer][:, start:] + patched[:, start:])
    if activation_name == "attn_out":
        attn_out = patched[:, start:]
    else:
        attn_out = native.attn_out(layer, _patched_z(native, trace, activation_name, layer, patched, start, keep))
    keep("attn_out", attn_out)
    resid_pre = trace.resid_pre[layer][:, start:]
    if native.parallel:
        return _kept(keep, "resid_post", resid_pre + attn_out + trace.mlp_out[layer][:, start:])
    return _kept(keep, "resid_mid", resid_pre + attn_out)


def _kept(keep: Callable[[str, Tensor], None], kind: str, value: Tensor) -> Tensor:
    keep(kind, value)
    return value


def _patched_z(
    native: NativeModel, trace: Trace, name: str, layer: int, patched: Tensor, start: int, keep: Callable[[str, Tensor], None]
) -> Tensor:
    """Head outputs ``[batch, pos - start, n_heads, d_head]`` of block ``layer`` with a q/k/v/pattern/attn_scores/z
    patch (given to ``keep`` as ``z``, with the pattern at destinations ``start..`` as ``pattern``)."""
    if name == "z":
        return _kept(keep, "z", patched[:, start:])
    if name == "attn_scores":  # the bridge's softmax follows hook_attn_scores directly (mask, cap, ALiBi before it)
        keep("attn_scores", patched[:, :, start:])
        pattern = _kept(keep, "pattern", patched[:, :, start:].softmax(dim=-1))
        return _kept(keep, "z", native.mix_values(pattern, trace.v[layer]))
    if name == "pattern":
        pattern = _kept(keep, "pattern", patched[:, :, start:])
        return _kept(keep, "z", native.mix_values(pattern, trace.v[layer]))
    q = patched if name == "q" else trace.q[layer]
    k_rot = native.rotate_k(layer, patched, 0) if name == "k" else trace.k_rot[layer]
    v = patched if name == "v" else trace.v[layer]
    pattern, z = native.attend(native.rotate_q(layer, q[:, start:], start), k_rot, v, start, layer)
    keep("pattern", pattern)
    return _kept(keep, "z", z)
