"""Stop-gradient variants of node attribution, and attribution at an already-intervened run.

Nanda's attribution-patching write-up takes an estimate apart by choosing which paths its gradient
may take. Every variant here is plain node attribution (:mod:`~fastpatch.attribution.nodes`: the
same sweeps, slices and result shapes) with the gradient pass run on an edited forward:

- ``frozen=("ln_scale",)``: every LayerNorm / RMSNorm scale (each norm's ``hook_scale``) is a
  constant at the patched run's value, so a patch acts on a norm's output only through its centred
  input divided by that fixed scale (the linearised norm);
- ``frozen=("pattern",)``: every attention pattern (``blocks.{l}.attn.hook_pattern``) is a constant,
  so a patch acts on attention only through the values (the OV circuit);
- ``not_mediated_by=[hook names]``: the effect that does not pass through those hook points.

A stop-gradient is ``x.detach()`` at the hook point: the forward is unchanged (on bridges whose
norms run HuggingFace's own module -- GPT-NeoX, LLaMA -- an edited ``hook_scale`` makes
TransformerLens rebuild the norm's output from the hooked scale, which differs at float rounding
and TransformerLens warns once), and no gradient flows upstream through the point. A node *at* a
stopped point is read before the stop (as GradDrop reads its own layer's output), so all of its
effect passes through that point and its estimate is 0: with ``frozen=("pattern",)`` the pattern,
score, query and key sweeps are 0; ``not_mediated_by=["blocks.1.hook_attn_out"]`` zeroes
``attn_out`` of layer 1 and every head of layer 1.

``patches=[...]``: the run whose gradient is taken is first intervened on (the next-edge search
step: attribution for every other node once some are patched). A patch is
``(activation_name, index)`` or ``(activation_name, index, patch_setter)`` exactly as in
``fastpatch.patching.get_act_patch_together`` (index a row of TransformerLens's sweep of that
activation, layer first; the setter TransformerLens's own), patched with the activations that are
patched in (the clean run's, or ``source``'s), or with ``patch_source``'s (e.g. a
:mod:`fastpatch.sources` ablation cache). The patched slice is set to a constant, as a hooked
forward with the setter sets it: no gradient reaches what computed it. The corrupted activations
of the estimate ``(clean - corrupted) . grad`` are then the intervened run's, so a slice patched to
the clean value has estimate 0.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from fastpatch.attribution import passes
from fastpatch.attribution.passes import SOURCE_DOC, Tokens
from fastpatch.engine.joint_plan import joint_sweeps
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn

__all__ = ["FROZEN", "attribute_nodes_variant", "get_attr_patch_variant"]

# name -> what is frozen (the hook points that get a stop-gradient)
FROZEN: Dict[str, str] = {
    "ln_scale": "the scale of every LayerNorm / RMSNorm (each norm's hook_scale)",
    "pattern": "every attention pattern (blocks.{l}.attn.hook_pattern)",
}

Hook = Tuple[str, Callable]


def _names(value: Union[str, Sequence[str]], what: str) -> List[str]:
    """A name or a list of names (a lone string is one name, not its characters)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{what} must be a name or a list of names, got {value!r}")
    return list(dict.fromkeys(items))


def _distinct_points(model: Any, names: Sequence[str]) -> List[str]:
    """``names`` without aliases of a hook point already listed (one stop-gradient per point)."""
    seen: Set[int] = set()
    out = []
    for name in names:
        if id(model.hook_dict[name]) not in seen:
            seen.add(id(model.hook_dict[name]))
            out.append(name)
    return out


def stopped_points(model: Any, frozen: Union[str, Sequence[str]], not_mediated_by: Union[str, Sequence[str]]) -> List[str]:
    """Every hook point that gets a stop-gradient, checked: ``frozen`` names of :data:`FROZEN`,
    ``not_mediated_by`` hook names of the model."""
    points: List[str] = []
    for name in _names(frozen, "frozen"):
        if name not in FROZEN:
            raise ValueError(f"unknown frozen component {name!r}; known: {sorted(FROZEN)} ({'; '.join(FROZEN.values())})")
        if name == "pattern":
            points += passes.hook_names(model, ["pattern"])
        else:
            scales = [n for n in model.hook_dict if n.endswith(".hook_scale")]
            if not scales:
                raise ValueError("frozen=('ln_scale',): the model has no norm scale hook point (hook_scale)")
            points += scales
    for name in _names(not_mediated_by, "not_mediated_by"):
        if name not in model.hook_dict:
            close = [n for n in model.hook_dict if n.split(".")[-1] == name.split(".")[-1]][:4]
            raise ValueError(
                f"not_mediated_by: the model has no hook point {name!r}"
                + (f" (hook points of that kind: {close}, ...)" if close else "")
            )
        points.append(name)
    return _distinct_points(model, list(dict.fromkeys(points)))


def parse_patches(model: Any, n_pos: int, patches: Sequence[Any]) -> List[Tuple[str, Callable, Tuple[int, ...]]]:
    """``(hook name, setter, index)`` of each patch, in ``get_act_patch_together``'s form and checked
    as it checks a cell (setter known, index within the activation's axes)."""
    if isinstance(patches, (str, bytes)) or not isinstance(patches, Sequence):
        raise ValueError(f"patches must be a list of (activation_name, index) patches, got {patches!r}")
    if len(patches) == 0:
        return []
    try:
        sweeps, (cell,) = joint_sweeps(model, n_pos, [list(patches)])
    except ValueError as error:
        message = str(error).removeprefix("cell 0: ")
        raise ValueError(message if message.startswith("patches") else f"patches: {message}") from None
    out = []
    for location in cell:
        sweep = sweeps[location.sweep]
        index = tuple(int(i) for i in sweep.indices[location.row])
        name = sweep.hook_name(index[0])
        if name not in model.hook_dict:
            raise ValueError(f"patches: the model has no hook point {name!r} (this architecture has no such activation)")
        out.append((name, sweep.patch_setter, index))
    return out


def _stop(name: str, fired: Set[str]) -> Hook:
    def hook(tensor: Tensor, hook: Any) -> Tensor:
        fired.add(name)
        return tensor.detach()  # identity forward, zero gradient upstream

    return name, hook


def _patch(name: str, setter: Callable, index: Tuple[int, ...], value: Tensor, fired: Set[str]) -> Hook:
    def hook(tensor: Tensor, hook: Any) -> Tensor:
        fired.add(name)
        # a copy: the setter writes in place, and the slice it writes becomes a constant
        return setter(tensor.clone(), index, value.to(tensor.dtype))

    return name, hook


def _scores(
    model: Any, runs: passes.Runs, metric: MetricFn, names: Sequence[str], reduce: str, stops: Sequence[str],
    patches: Sequence[Tuple[str, Callable, Tuple[int, ...]]], patch_source: Optional[Mapping[str, Tensor]],
) -> Dict[str, Tensor]:
    """``(clean - corrupted) * d metric / d act`` per element at ``names``, the corrupted run patched
    by ``patches`` and the gradient stopped at ``stops``."""
    patch_names = list(dict.fromkeys(p[0] for p in patches))
    fired: Set[str] = set()
    with preserved_model_state(model):
        if patch_source is None:
            clean = passes.patch_values(model, runs, list(dict.fromkeys([*names, *patch_names])))
            patch_in = clean
        else:
            clean = passes.patch_values(model, runs, names)
            patch_in = passes.patch_values(model, passes.Runs(runs.target, None, patch_source), patch_names, "patch_source")
        before = [_patch(n, setter, index, patch_in[n], fired) for n, setter, index in patches]
        after = [_stop(n, fired) for n in stops]
        corrupted: Dict[str, Tensor] = {}
        grads = passes.gradients(
            model, runs.target, metric, names, reduce, record=corrupted, after_hooks=after, before_hooks=before
        )
    passes.require_fired([*patch_names, *stops], fired)
    return passes.estimates(names, clean, corrupted, grads)


def attribute_nodes_variant(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    sweeps: Optional[Sequence[str]] = None, *, frozen: Union[str, Sequence[str]] = (),
    not_mediated_by: Union[str, Sequence[str]] = (), patches: Sequence[Any] = (),
    patch_source: Optional[Mapping[str, Tensor]] = None, reduce: str = "scalar",
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Dict[str, Tensor]:
    """Node attribution with stop-gradients and/or at an intervened run (see the module docstring):
    several sweeps (names of :data:`~fastpatch.attribution.nodes.SWEEPS` or ``SCORE_SWEEPS``, default
    all the model has) from one clean forward, one corrupted forward and one backward,
    ``{sweep: estimate}`` each shaped like ``get_attr_patch_<sweep>``'s result.

    ``frozen``: names of :data:`FROZEN` (``"ln_scale"``, ``"pattern"``). ``not_mediated_by``: hook
    names (e.g. ``"blocks.1.hook_attn_out"``). ``patches``: ``(activation_name, index[, setter])``
    applied to the patched run first, with ``patch_source``'s activations if given, else the
    patched-in ones. With none of them this is ``attribute_nodes``. The model keeps no hook
    afterwards, also when a check raises.
    """
    if sweeps is None:
        sweeps = passes.model_sweeps(model)
    sweeps = list(sweeps)
    names = passes.hook_names(model, [passes.check_sweep(s) for s in sweeps])
    runs = passes.resolve_runs(model, "attribute_nodes_variant()", reduce, clean_tokens, corrupted_tokens, source, direction)
    stops = stopped_points(model, frozen, not_mediated_by)
    parsed = parse_patches(model, int(runs.target.shape[-1]), patches)
    if patch_source is not None and not isinstance(patch_source, (Mapping, ActivationCache)):
        raise ValueError(f"patch_source must be an activation cache (hook name -> tensor), got {type(patch_source).__name__}")
    scores = _scores(model, runs, patching_metric, names, reduce, stops, parsed, patch_source)
    return {s: passes.finish(passes.layer_stack(model, scores, s), reduce) for s in sweeps}


attribute_nodes_variant.__doc__ += SOURCE_DOC


def get_attr_patch_variant(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    sweep: str, *, frozen: Union[str, Sequence[str]] = (), not_mediated_by: Union[str, Sequence[str]] = (),
    patches: Sequence[Any] = (), patch_source: Optional[Mapping[str, Tensor]] = None, reduce: str = "scalar",
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Float[Tensor, "..."]:
    """One sweep of :func:`attribute_nodes_variant`: shaped like ``get_attr_patch_<sweep>`` (e.g.
    ``sweep="attn_head_out_all_pos"`` -> ``[n_layers, n_heads]``, trailing ``batch`` axis for
    ``reduce="none"``)."""
    out = attribute_nodes_variant(
        model, clean_tokens, corrupted_tokens, patching_metric, [sweep], frozen=frozen, not_mediated_by=not_mediated_by,
        patches=patches, patch_source=patch_source, reduce=reduce, source=source, direction=direction,
    )
    return out[sweep]


get_attr_patch_variant.__doc__ += SOURCE_DOC
