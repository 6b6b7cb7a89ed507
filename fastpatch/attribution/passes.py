"""What every attribution method shares: input checks, hook names, the zero-probe gradient pass,
activation capture, the sweep table and its layer stacks, and the integrated-gradients step schedule.

The method modules (:mod:`~fastpatch.attribution.nodes`, :mod:`~fastpatch.attribution.edges`,
:mod:`~fastpatch.attribution.integrated_gradients`, :mod:`~fastpatch.attribution.atpstar`,
:mod:`~fastpatch.attribution.graddrop`, :mod:`~fastpatch.attribution.verification`,
:mod:`~fastpatch.attribution.attention`) share what they have in common through this module; none
imports another's private names.

Metric conventions (``reduce``):

- ``"scalar"``: ``metric(logits)`` returns a 0-d tensor (e.g. the batch mean of a per-prompt
  quantity); a result is the estimated change of that scalar.
- ``"none"``: ``metric(logits)`` returns ``[batch]``; the gradient of its sum is taken (prompts do
  not interact in eval mode, so row ``i`` of the gradient belongs to prompt ``i`` alone) and a
  result has a trailing ``batch`` axis with one value per prompt.

Integrated-gradients steps (one vocabulary, :data:`RULES`, for every method): ``ig_steps`` points
``alpha`` in ``[0, 1]`` along a straight path from a baseline (``alpha = 0``) to the run being
explained (``alpha = 1``), averaged with equal weights -- ``"left"``: ``k / n``; ``"midpoint"``:
``(k + 0.5) / n`` (error ``O(1 / n^2)``); ``"right"``: ``(k + 1) / n``, for ``k = 0 .. n - 1``.
Each method offers the midpoint rule and the end-point rule at which one step is its plain,
non-integrated score: ``"left"`` for patching estimates (``alpha = 0`` is the corrupted run),
``"right"`` for attention attribution (``alpha = 1`` is the unscaled run).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Container, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import transformer_lens.utilities as tl_utils
from jaxtyping import Float, Int
from torch import Tensor

from fastpatch import patching
from fastpatch.engine.checks import cached_activation, check_cached_activation, check_tokens, require_eval_mode
from fastpatch.engine.metric_set import activation_reads, capture_hooks
from fastpatch.engine.model_state import refuse_user_hooks
from fastpatch.metrics import MetricFn
from fastpatch.sources import DIRECTIONS, resolve_direction  # noqa: F401 (DIRECTIONS re-exported)

Tokens = Int[Tensor, "batch pos"]  # token ids, as every method takes them
REDUCES = ("scalar", "none")
RULES = ("left", "midpoint", "right")

# ---- the sweep table ----------------------------------------------------------------------------
# sweep name -> (activation name for ``utils.get_act_name``, slice reducer). The reducer turns
# per-element scores into one value per cell, batch axis first. Same activations and cell grids as
# ``transformer_lens.patching.get_act_patch_<name>`` (plus mlp_neuron_by_pos).


def _sum_last(p: Tensor) -> Tensor:
    """``[batch, pos, d_model] -> [batch, pos]``; ``[batch, pos, head, d_head] -> [batch, pos, head]``;
    ``[batch, head, dest, src] -> [batch, head, dest]`` (a whole destination row of the pattern)."""
    return p.sum(-1)


def _head_all_pos(p: Tensor) -> Tensor:
    """``[batch, pos, head, d_head]`` -> ``[batch, head]``."""
    return p.sum((1, 3))


def _pattern_all_pos(p: Tensor) -> Tensor:
    """``[batch, head, dest, src]`` -> ``[batch, head]``."""
    return p.sum((2, 3))


def _unchanged(p: Tensor) -> Tensor:
    """Every element is a cell: pattern ``[batch, head, dest, src]``, neurons ``[batch, pos, d_mlp]``."""
    return p


SWEEPS: Dict[str, Tuple[str, Callable[[Tensor], Tensor]]] = {
    "resid_pre": ("resid_pre", _sum_last),
    "resid_mid": ("resid_mid", _sum_last),
    "attn_out": ("attn_out", _sum_last),
    "mlp_out": ("mlp_out", _sum_last),
    "attn_head_out_by_pos": ("z", _sum_last),
    "attn_head_q_by_pos": ("q", _sum_last),
    "attn_head_k_by_pos": ("k", _sum_last),
    "attn_head_v_by_pos": ("v", _sum_last),
    "attn_head_pattern_by_pos": ("pattern", _sum_last),
    "attn_head_pattern_dest_src_pos": ("pattern", _unchanged),
    "attn_head_out_all_pos": ("z", _head_all_pos),
    "attn_head_q_all_pos": ("q", _head_all_pos),
    "attn_head_k_all_pos": ("k", _head_all_pos),
    "attn_head_v_all_pos": ("v", _head_all_pos),
    "attn_head_pattern_all_pos": ("pattern", _pattern_all_pos),
    "mlp_neuron_by_pos": ("post", _unchanged),
}

# The pattern sweeps' cells on the pre-softmax scores (``hook_attn_scores``, masked entries -inf,
# whose difference counts as 0): ``fastpatch.patching.get_act_patch_attn_head_scores_*``. Asked for
# by name; not in :data:`SWEEPS`, the default set of ``attribute_nodes``.
SCORE_SWEEPS: Dict[str, Tuple[str, Callable[[Tensor], Tensor]]] = {
    "attn_head_scores_by_pos": ("attn_scores", _sum_last),
    "attn_head_scores_dest_src_pos": ("attn_scores", _unchanged),
    "attn_head_scores_all_pos": ("attn_scores", _pattern_all_pos),
}
ALL_SWEEPS = {**SWEEPS, **SCORE_SWEEPS}  # every sweep an attribution method may be asked for


def model_sweeps(model: Any) -> List[str]:
    """The :data:`SWEEPS` whose activation the model has (the default set of the node methods; e.g. no
    ``resid_mid`` on parallel attention+MLP blocks)."""
    return [s for s, (act, _) in SWEEPS.items() if tl_utils.get_act_name(act, 0) in model.hook_dict]


def check_sweep(sweep: str) -> str:
    """``sweep``'s activation name (:data:`SWEEPS` or :data:`SCORE_SWEEPS`), or a ``ValueError`` naming the known sweeps."""
    if sweep not in ALL_SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {sorted(ALL_SWEEPS)}")
    return ALL_SWEEPS[sweep][0]


def _neuron_setter(corrupted_activation: Tensor, index: Sequence[int], clean_activation: Tensor) -> Tensor:
    """One MLP neuron at one position: ``index = (layer, pos, neuron)`` on ``[batch, pos, d_mlp]``."""
    _, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def exact_sweep(sweep: str) -> Tuple[str, Callable, Tuple[str, ...]]:
    """(activation name, patch setter, index axis names) of ``fastpatch.patching.get_act_patch_<sweep>``;
    for mlp_neuron_by_pos, which has no exact sweep there, a setter of one neuron at one position."""
    check_sweep(sweep)
    if sweep == "mlp_neuron_by_pos":
        return "post", _neuron_setter, ("layer", "pos", "neuron")
    fn: partial = getattr(patching, f"get_act_patch_{sweep}")
    kw = fn.keywords
    return kw["activation_name"], kw["patch_setter"], tuple(kw["index_axis_names"])


# ---- input checks -------------------------------------------------------------------------------
def check_inputs(model: Any, operation: str, reduce: str, **tokens: Any) -> None:
    """Refuse what no attribution method can run on, before any pass.

    ``tokens``: one batch of prompts (``tokens=...``) or a pair (``clean_tokens=...,
    corrupted_tokens=...``), which must then have the same shape.
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES} for attribution, got {reduce!r}")
    require_eval_mode(model, operation=operation)
    refuse_user_hooks(model, operation)  # they would run on the stacked passes, not on TransformerLens's forward
    for name, value in tokens.items():
        check_tokens(model, value, name)
    shapes = {name: tuple(value.shape) for name, value in tokens.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            " and ".join(f"{name} {shape}" for name, shape in shapes.items())
            + " must have the same shape: attribution pairs activations prompt by prompt, position by position"
        )
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{operation} needs autograd, but torch.inference_mode() is active")


# ---- which run is patched, and with what ---------------------------------------------------------

class Runs(NamedTuple):
    """The run an estimate patches (gradients are taken there) and what is patched into it.

    ``target``: tokens of the patched run. The patched-in activations come from a run on
    ``values`` (tokens), or from ``source`` (a cache such as :mod:`fastpatch.sources` builds).
    """

    target: Tensor
    values: Optional[Tensor]
    source: Optional[Mapping[str, Tensor]]


def resolve_runs(
    model: Any, operation: str, reduce: str, clean_tokens: Optional[Tensor], corrupted_tokens: Optional[Tensor],
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> Runs:
    """Check the inputs (:func:`check_inputs`) and name the patched run
    (:func:`fastpatch.sources.resolve_direction`: ``"noising"`` is the denoising estimate with the two
    token arguments swapped; ``source`` replaces the tokens of the run whose activations are patched in).
    """
    run = resolve_direction(clean_tokens, corrupted_tokens, source, direction)
    tokens = {run.target_name: run.target, **({} if run.values is None else {run.values_name: run.values})}
    check_inputs(model, operation, reduce, **tokens)
    return Runs(run.target, run.values, source)


def patch_values(model: Any, runs: Runs, names: Sequence[str], what: str = "source") -> Dict[str, Tensor]:
    """The activations patched in at ``names``: captured from the ``values`` run, or read from ``source``
    (checked against the patched run's batch and positions; ``[1, ...]`` broadcasts over the batch;
    ``what``: the argument's name in the errors)."""
    if runs.source is None:
        return capture(model, runs.values, names)
    out = {}
    for name in names:
        act = cached_activation(runs.source, name, what)
        check_cached_activation(act, name, runs.target, what=what)
        out[name] = act
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_schedule(ig_steps: Optional[int], rule: str, rules: Tuple[str, ...], *, optional: bool = False) -> None:
    """``ig_steps`` a positive integer (``True`` is not a step count; ``None`` only where
    ``optional``) and ``rule`` one of the method's ``rules`` (a subset of :data:`RULES`)."""
    if not (_is_count(ig_steps) or (optional and ig_steps is None)):
        what = "None or a positive integer" if optional else "a positive integer"
        raise ValueError(f"ig_steps must be {what}, got {ig_steps!r}")
    if rule not in rules:
        raise ValueError(f"rule must be one of {rules}, got {rule!r}")


def ig_alphas(ig_steps: int, rule: str) -> List[float]:
    """The ``ig_steps`` interpolation points of ``rule`` (see the module docstring)."""
    offset = {"left": 0.0, "midpoint": 0.5, "right": 1.0}[rule]
    return [(k + offset) / ig_steps for k in range(ig_steps)]


def hook_names(model: Any, activations: Sequence[str]) -> List[str]:
    """Every layer's hook name of each activation (e.g. ``"z"``), activation by activation."""
    names = []
    for act in dict.fromkeys(activations):
        for layer in range(model.cfg.n_layers):
            name = tl_utils.get_act_name(act, layer)
            if name not in model.hook_dict:
                raise ValueError(
                    f"the model has no hook point {name!r}: this architecture has no {act!r} activation "
                    "(for example resid_mid on parallel attention+MLP blocks)"
                )
            names.append(name)
    return names


def _check_metric(value: Any, reduce: str, batch: int) -> Tensor:
    """The metric's value as the scalar to differentiate (a ``[batch]`` metric is summed)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"the patching metric must return a floating-point tensor, got {got}")
    if reduce == "scalar" and value.ndim != 0:
        raise ValueError(
            f"with reduce='scalar' the patching metric must return a 0-d scalar (e.g. the batch mean), "
            f"got shape {tuple(value.shape)}; use reduce='none' for a [batch] metric"
        )
    if reduce == "none" and tuple(value.shape) != (batch,):
        raise ValueError(
            f"with reduce='none' the patching metric must return [batch]=[{batch}], got shape {tuple(value.shape)}"
        )
    if not value.requires_grad:
        raise ValueError("the patching metric does not depend on the logits (its value carries no gradient)")
    return value if reduce == "scalar" else value.sum()


# ---- passes -------------------------------------------------------------------------------------
def gradients(
    model: Any,
    tokens: Tokens,
    metric: MetricFn,
    names: Sequence[str],
    reduce: str,
    values: Optional[Dict[str, Tensor]] = None,
    record: Optional[Dict[str, Tensor]] = None,
    after_hooks: Sequence[Tuple[str, Callable]] = (),
    before_hooks: Sequence[Tuple[str, Callable]] = (),
) -> Dict[str, Tensor]:
    """``d metric / d act`` at every hook name, from one forward and one ``autograd.grad``.

    Zero probes: each hook returns ``act + zeros(requires_grad)``, so the forward is unchanged bit
    for bit and the probe's gradient is the activation's as the hook sees it (the canonical
    ``[batch, pos, head, d_head]`` layout on ``TransformerBridge``'s converted points, where the
    hook's input is a view the model never consumes and its ``.grad`` would stay empty);
    ``torch.autograd.grad`` touches no parameter's ``.grad``. Where ``values`` has a name, the
    activation is *set* to it in the forward with an identity backward (the model's total
    derivative at that state); ``record`` receives each activation as the hook saw it.
    ``after_hooks`` are extra forward hooks registered *after* the probes, so on a hook point they
    share with a probe they see the probed activation (GradDrop's stop-gradients: a probe upstream
    of a ``detach`` on the same point gets a zero gradient). ``before_hooks`` run *before* the probes
    (and ``record``): edits of the run whose gradient is taken (patches applied first).

    Afterwards no autograd graph stays attached to the model (see :func:`_release_graph`).
    """
    values = values or {}
    probes: Dict[str, Tensor] = {}

    def probe(name: str):
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            if record is not None:
                record[name] = tensor.detach().clone()
            if name in values:
                tensor = tensor + difference(values[name].to(tensor.dtype), tensor).to(tensor.dtype).detach()
            probes[name] = torch.zeros_like(tensor, requires_grad=True)
            return tensor + probes[name]

        return hook

    # a metric that reads activations gets them as the forward computed them, gradients attached
    # (captured last, so after the probes and ``after_hooks``)
    capture, acts = capture_hooks(activation_reads(metric), detach=False)
    fwd_hooks = list(before_hooks) + [(n, probe(n)) for n in names] + list(after_hooks) + capture
    try:
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
            logits = model(tokens)
            value = metric.from_activations(logits, acts) if capture else metric(logits)
            target = _check_metric(value, reduce, int(tokens.shape[0]))
            require_fired(names, probes)
            grads = torch.autograd.grad(target, [probes[n] for n in names], allow_unused=True)
    finally:
        _release_graph(model)
    return {n: (g if g is not None else torch.zeros_like(probes[n])).detach() for n, g in zip(names, grads)}


def _release_graph(model: Any) -> None:
    """Detach tensors a forward with gradients left on the model's modules.

    ``TransformerBridge``'s attention modules keep the last forward's pattern (``_pattern``); after
    a forward with gradients it is a non-leaf tensor, which holds its autograd graph alive and makes
    ``copy.deepcopy(model)`` fail ("Only Tensors created explicitly by the user ... support the
    deepcopy protocol"). The values are kept; only the graph is dropped, as a no-grad forward
    would leave it.
    """
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, Tensor) and not isinstance(value, torch.nn.Parameter) and value.grad_fn is not None:
                setattr(module, key, value.detach())


def require_fired(names: Sequence[str], seen: Container[str]) -> None:
    """A ``ValueError`` naming the hook points in ``names`` that are not in ``seen`` (the ones that fired)."""
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"hook points {missing} did not fire during the forward pass")


def capture(
    model: Any, tokens: Tokens, names: Sequence[str], fwd_hooks: Sequence[Tuple[str, Callable]] = ()
) -> Dict[str, Tensor]:
    """Activations at ``names`` of one no-grad forward (``fwd_hooks``: editing hooks that run first)."""
    store: Dict[str, Tensor] = {}

    def keep(name: str):
        def hook(tensor: Tensor, hook: Any) -> None:
            store[name] = tensor.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks) + [(n, keep(n)) for n in names]):
        model(tokens)
    require_fired(names, store)
    return store


# ---- public functions -----------------------------------------------------------------------------
# run(model, runs, patching_metric, reduce) -> estimate
Estimator = Callable[[Any, Runs, MetricFn, str], Tensor]


def named_estimator(name: str, doc: str, run: Estimator, shape: str) -> Callable[..., Tensor]:
    """The public function ``name(model, clean_tokens, corrupted_tokens, patching_metric, *,
    reduce="scalar", source=None, direction="denoising")`` that every fixed-sweep ``get_attr_patch_*``
    shares: it checks the inputs (:func:`resolve_runs`, with ``"name()"`` as the operation that error
    messages name) and calls ``run`` with the resolved :class:`Runs`. ``shape``: the result's axes for
    ``reduce="scalar"`` (e.g. ``"[n_layers, pos]"``), written into the return annotation with the
    trailing batch axis of ``reduce="none"``."""

    def fn(
        model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn, *,
        reduce: str = "scalar", source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
    ) -> Float[Tensor, "..."]:
        runs = resolve_runs(model, f"{name}()", reduce, clean_tokens, corrupted_tokens, source, direction)
        return run(model, runs, patching_metric, reduce)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc + SOURCE_DOC
    axes = shape.strip("[]").replace(",", "")
    fn.__annotations__["return"] = f'Float[Tensor, "{axes} *batch"]'
    return fn


SOURCE_DOC = """

    ``source=``: patch in the activations of a cache (e.g. an ablation from :mod:`fastpatch.sources`)
    instead of a run on ``clean_tokens`` (then ``None``). ``direction="noising"``: patch the
    corrupted run's activations (or ``source``'s) into the clean run instead, the same as swapping
    the two token arguments.
"""


# ---- arithmetic on captured activations ---------------------------------------------------------
def score_dtype(t: Tensor) -> torch.dtype:
    """What scores are computed in: float32, or float64 for a float64 model."""
    return torch.promote_types(t.dtype, torch.float32)


def difference(clean: Tensor, corrupted: Tensor) -> Tensor:
    """``clean - corrupted`` in :func:`score_dtype` (``[1, ...]`` ``clean`` broadcasts over the batch);
    0 where they are equal, so the ``-inf`` of masked attention scores is no change rather than NaN."""
    if clean.shape[1:] != corrupted.shape[1:] or clean.shape[0] not in (1, corrupted.shape[0]):
        raise ValueError(
            f"the patched-in activation has shape {tuple(clean.shape)}, the patched run's {tuple(corrupted.shape)}: "
            "they come from different models or sequence lengths"
        )
    dtype = score_dtype(clean)
    clean, corrupted = clean.to(dtype), corrupted.to(dtype)
    return torch.where(clean == corrupted, torch.zeros((), dtype=dtype, device=clean.device), clean - corrupted)


def estimates(
    names: Sequence[str], clean: Dict[str, Tensor], corrupted: Dict[str, Tensor], grads: Dict[str, Tensor]
) -> Dict[str, Tensor]:
    """``(clean - corrupted) * d metric / d act`` per element at every hook name (:func:`difference`'s dtype)."""
    out = {}
    for name in names:
        delta = difference(clean[name], corrupted[name])
        out[name] = delta * grads[name].to(delta.dtype)
    return out


def layer_stack(model: Any, scores: Dict[str, Tensor], sweep: str) -> Tensor:
    """One sweep's cells from per-element scores by hook name, batch first: ``[batch, n_layers, *cell]``."""
    act, reducer = ALL_SWEEPS[sweep]
    return torch.stack([reducer(scores[tl_utils.get_act_name(act, l)]) for l in range(model.cfg.n_layers)], dim=1)


def finish(values: Float[Tensor, "batch ..."], reduce: str) -> Tensor:
    """Internal ``[batch, ...]`` -> ``[...]`` (``"scalar"``: summed over prompts) or ``[..., batch]``."""
    return values.sum(0) if reduce == "scalar" else values.movedim(0, -1).contiguous()
