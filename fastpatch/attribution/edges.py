"""Edge attribution patching: a first-order estimate of every writer -> reader edge, batched.

The residual stream is a running sum of *writes*: the token embedding, every attention head's
output ``z[:, :, h] @ W_O[h]`` and every MLP's output. A *reader* consumes a copy of it: each
head's Q, K and V input (the pre-norm residual that head's ``ln1`` normalises), each MLP's input
(``ln2``'s input) and the logits (``ln_final``'s input, the final residual). Edge attribution
(EAP; TransformerLens ``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))``)
scores the edge ``writer -> reader`` by how much patching the writer's write *into that reader
alone* from corrupted to clean moves the metric, to first order at the corrupted run::

    score[w, r] = sum over prompts, positions of (write_clean[w] - write_corrupted[w]) . d metric / d input[r]

The metric is a scalar, the batch mean of a per-prompt quantity, so the sum over prompts is
TransformerLens's mean of per-prompt scores. Positions are summed; TransformerLens keeps one
edge per position (a writer at position ``p`` feeds a reader at position ``p``: the residual
stream only carries information along a position, the readers' attention mixes positions), so
its per-position edges summed over positions are exactly our cells.

Three passes for the whole batch, as for node attribution: one clean forward (writes only), one
corrupted forward with zero probes at every reader input (``activation + zeros(requires_grad)``:
the forward is unchanged bit for bit), and ONE ``torch.autograd.grad`` for all the readers'
input gradients. MLP inputs are read at ``blocks.{l}.ln2.hook_in`` (the MLP's copy only; on
parallel attention+MLP blocks too), the logits at ``ln_final.hook_in``, and Q/K/V inputs at the
gradient TransformerLens's ``use_split_qkv_input`` fork (``attn.hook_{q,k,v}_input``) would read:
head ``h``'s own copy of the residual gets ``J_ln1(x)^T (gamma * (dq_h @ W_Q[h]^T))``, from the
gradient at ``hook_q`` (before rotary) and the corrupted residual ``x`` at ``ln1``'s input, without
the fork (which not every attention bridge has). MLP and logits readers are one einsum each,
``[writers, batch, pos, d_model] x [readers, batch, pos, d_model] -> [writers, readers]``; the
Q/K/V readers (``n_layers * (n_heads + 2 * n_key_value_heads)``) go through :func:`fastpatch.ops.edge_scores.qkv_edge_scores`
(``backend``): the fused Triton kernel on CUDA in half precision, a row-chunked PyTorch contraction
elsewhere (in fp32 it is predicted faster than the kernel, see ``docs/design-notes.md``), both
with the analytic LayerNorm/RMSNorm VJP (checked against autograd through the model's own ``ln1``
on the run) and neither materialising the ``[batch, pos, n_readers, d_model]`` reader gradients;
``backend="autograd"`` is the VJP of the ``ln1`` module itself, materialised.

Sources and direction (as for node attribution, :func:`fastpatch.attribution.passes.resolve_runs`):
``source=`` (e.g. a :mod:`fastpatch.sources` ablation cache) makes the writes ``write_source[w] -
write_corrupted[w]``; ``direction="noising"`` takes the gradients at the clean run and patches the
corrupted run's writes into it, the same as swapping the two token arguments.

Integrated gradients (``ig_steps``; EAP-IG, Hanna et al. 2024): the reader gradients (and the Q/K/V
norm linearisation point) are taken on ``ig_steps`` corrupted runs with the token embedding
interpolated towards the clean one, and the per-step scores averaged; see
:func:`get_attr_patch_edges`.

Code: :class:`_EdgeHooks` names the hook points, :func:`_writes` computes the clean-minus-corrupted
writes once, and :class:`_EdgeContraction` turns one run's reader gradients into the
``[n_writers, n_readers]`` scores; :func:`get_attr_patch_edges` runs the passes and averages.

Valid edges (the reader comes after the writer): the embedding feeds every reader; a head of
layer ``l`` feeds the Q/K/V of layers ``> l``, the MLPs of layers ``>= l`` (``> l`` on parallel
attention+MLP blocks, whose MLP reads the block input) and the logits; the MLP of layer ``l``
feeds the Q/K/V and MLPs of layers ``> l`` and the logits. Other cells are 0 and ``valid`` is
``False`` there.

Linearity: a reader's input is the sum of the writes before it plus constants (position
embeddings equal in both runs, biases), so a reader's incoming edge scores summed over writers
equal that reader's own node score ``(input_clean - input_corrupted) . d metric / d input``; and
since a write reaches the metric only through the readers after it, a writer's outgoing edge
scores summed over readers equal its node score (:meth:`EdgeScores.node_scores`, TransformerLens's
``node_scores`` of an edge sweep).

Grouped-/multi-query attention (which TransformerLens refuses): a K/V input is shared by the
query heads of its group, so the K/V readers are the K/V heads (``"L{l}KV{g}.k"``), whose input
gradient is ``J_ln1(x)^T (dk_g @ W_K[g]^T)`` as for any head. Per-position edges: ``per_position``.
Refused: models in training mode. The model is handed back with its hooks, flags and mode.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from fastpatch.attribution.integrated_gradients import IG_RULES
from fastpatch.attribution.passes import (
    SOURCE_DOC,
    Runs,
    Tokens,
    capture,
    check_schedule,
    difference,
    gradients,
    ig_alphas,
    patch_values,
    resolve_runs,
    score_dtype,
)
from fastpatch.engine.edge_plan import edge_layout, valid_edges
from fastpatch.engine.model_state import preserved_model_state
from fastpatch.metrics import MetricFn
from fastpatch.ops.edge_scores import norm_vjp, qkv_edge_scores

__all__ = ["BACKENDS", "EdgeScores", "get_attr_patch_edges"]

QKV = ("q", "k", "v")
BACKENDS = ("auto", "torch", "triton", "autograd")
# TransformerLens normalization_type -> the analytic VJP that models it (checked against autograd)
_NORM_KINDS = {"LN": "LN", "LNPre": "LN", "RMS": "RMS", "RMSPre": "RMS"}


@dataclass
class EdgeScores:
    """Edge scores ``[n_writers, n_readers]`` (``[n_writers, n_readers, pos]`` per position) with
    their names and validity mask ``[n_writers, n_readers]``.

    Writers: ``"embed"``, then per layer ``"L{l}H{h}"`` for every head and ``"MLP{l}"``.
    Readers: per layer ``"L{l}H{h}.q"`` for every head, then ``.k``, then ``.v`` (on grouped-query
    models one K/V reader per K/V head, ``"L{l}KV{g}.k"``), then ``"MLP{l}.in"``; last ``"logits"``
    (``fastpatch.engine.edge_plan.edge_layout``). ``scores`` is 0 wherever ``valid`` is ``False``.
    ``baseline``: the metric of the unpatched run the scores are changes of (exact edges; ``None``
    for attribution).
    """

    scores: Tensor
    valid: Tensor
    writer_names: List[str]
    reader_names: List[str]
    baseline: Optional[float] = None

    @property
    def per_position(self) -> bool:
        return self.scores.ndim == 3

    def _cells(self) -> Tuple[Tensor, ...]:
        """Indices of every valid edge (and position), writer-major."""
        valid = self.valid
        if self.per_position:
            valid = valid[:, :, None].expand_as(self.scores)
        return torch.nonzero(valid, as_tuple=True)

    def _frame(self, cells: Tuple[Tensor, ...], values: Tensor) -> pd.DataFrame:
        columns = {
            "writer": [self.writer_names[int(i)] for i in cells[0]],
            "reader": [self.reader_names[int(i)] for i in cells[1]],
        }
        if self.per_position:
            columns["pos"] = cells[2].tolist()
        columns["score"] = values.tolist()
        return pd.DataFrame(columns)

    def top_edges(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` valid edges with the largest ``|score|``: columns writer, reader (pos), score."""
        cells = self._cells()
        values = self.scores[cells]
        order = torch.argsort(values.abs(), descending=True, stable=True)[:k]
        return self._frame(tuple(i[order] for i in cells), values[order])

    def node_scores(self) -> pd.Series:
        """Each writer's outgoing edge scores summed over readers (TransformerLens's ``node_scores``
        of an edge sweep, summed over positions): for attribution its node attribution score, since
        a write reaches the metric only through the readers after it, the logits reader carrying
        the direct path."""
        summed = self.scores.sum(tuple(range(1, self.scores.ndim)))
        return pd.Series(summed.tolist(), index=self.writer_names, name="score")

    def to_frame(self) -> pd.DataFrame:
        """Every valid edge: writer, reader, (pos,) score."""
        cells = self._cells()
        return self._frame(cells, self.scores[cells])


def _check(
    model: Any, clean_tokens: Any, corrupted_tokens: Any, source: Optional[Mapping[str, Tensor]], direction: str,
    backend: str, ig_steps: Optional[int], rule: str,
) -> Runs:
    """Refuse bad arguments and unsupported models before any pass; the patched run and what is
    patched into it (``passes.resolve_runs``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_schedule(ig_steps, rule, IG_RULES, optional=True)
    runs = resolve_runs(model, "get_attr_patch_edges()", "scalar", clean_tokens, corrupted_tokens, source, direction)
    if ig_steps is not None and runs.values is None:
        # EAP-IG's path ends at the run on the other tokens; an ablation cache's writes are not what
        # the model computes from its (ablated) embedding, so there is no such run to integrate towards
        raise ValueError(
            "ig_steps with source= has no meaning for edges: EAP-IG interpolates the patched run's token embedding "
            "towards the tokens of the run whose activations are patched in, and a source cache is not a run on "
            "tokens; give those tokens instead of source=, or ig_steps=None"
        )
    cfg = model.cfg
    if backend == "triton" and getattr(cfg, "normalization_type", None) not in _NORM_KINDS:
        # refused before any pass; conventions are checked on the corrupted run's residual (_ln1_spec)
        raise ValueError(
            f"backend='triton' needs LayerNorm/RMSNorm pre-attention norms: normalization_type="
            f"{getattr(cfg, 'normalization_type', None)!r} is not one of {sorted(_NORM_KINDS)}"
        )
    return runs


def _qkv_input_grads(model: Any, layer: int, resid: Tensor, grads: List[Tensor]) -> Float[Tensor, "reader batch pos d_model"]:
    """d metric / d (the pre-norm residual copy each Q/K/V reader's projection reads), from the
    gradients at ``hook_q/k/v`` ``[batch, pos, heads, d_head]``: readers are the query heads, then
    the K heads, then the V heads (K/V heads on grouped-query models).

    Head ``h``'s Q is ``ln1(x) @ W_Q[h] + b_Q[h]`` (rotary, if any, comes after ``hook_q``), so the
    gradient at its own copy of ``x`` is ``J_ln1(x)^T (dq_h @ W_Q[h]^T)``: the vector-Jacobian
    product of the block's own ``ln1`` module, evaluated at the corrupted residual for every
    reader's cotangent at once. This is the gradient TransformerLens's ``use_split_qkv_input`` fork
    (``attn.hook_{q,k,v}_input``) reads, without the fork (which not every attention bridge has)
    and without touching the model's flags.
    """
    attn, ln1 = model.blocks[layer].attn, model.blocks[layer].ln1
    cot = torch.cat(
        [torch.einsum("bphe,hde->hbpd", g, W.detach().to(g.dtype)) for g, W in zip(grads, (attn.W_Q, attn.W_K, attn.W_V))]
    )  # [readers, b, p, d_model]
    n_readers = cot.shape[0]
    x = resid.detach()[None].expand(n_readers, *resid.shape).reshape(-1, *resid.shape[1:]).requires_grad_(True)
    with torch.enable_grad():
        out = ln1(x)
        (gx,) = torch.autograd.grad(out, x, cot.reshape(out.shape).to(out.dtype))
    return gx.detach().view(cot.shape)


def _ln1_eps(model: Any, ln1: Any) -> float:
    """The epsilon ``ln1`` actually uses: a ``TransformerBridge`` norm computes with ``cfg.eps``
    unless it runs the wrapped HuggingFace module's own forward (native autograd, folded norms)."""
    cfg = model.cfg
    if hasattr(ln1, "use_native_layernorm_autograd"):
        if ln1.use_native_layernorm_autograd or getattr(cfg, "layer_norm_folding", False):
            component = getattr(ln1, "original_component", None)
            for attr in ("eps", "variance_epsilon"):
                value = getattr(component, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
        return float(getattr(cfg, "eps", 1e-5))
    value = getattr(ln1, "eps", None)
    return float(value) if isinstance(value, (int, float)) else float(getattr(cfg, "eps", 1e-5))


def _ln1_spec(model: Any, resid: List[Tensor]) -> Tuple[Optional[Tuple[str, Tensor, float]], str]:
    """``((norm, gamma [L, d_model], eps), "")`` when every block's ``ln1`` is a LayerNorm / RMSNorm
    whose analytic VJP (``fastpatch.ops.edge_scores.norm_vjp``) matches autograd through the module
    itself at ``resid[l]`` (the run's ln1 input); ``(None, reason)`` otherwise. The check guards
    against conventions read wrongly (epsilon, a ``1 + w`` weight, a different norm): the kernel
    never sees the module, so a mismatch would otherwise be a silently different number."""
    cfg = model.cfg
    norm = _NORM_KINDS.get(getattr(cfg, "normalization_type", None))
    if norm is None:
        return None, f"normalization_type={getattr(cfg, 'normalization_type', None)!r} is not one of {sorted(_NORM_KINDS)}"
    gammas = []
    eps = None
    for l, x in enumerate(resid):
        ln1 = model.blocks[l].ln1
        eps_l = _ln1_eps(model, ln1)
        if eps is not None and eps_l != eps:
            return None, f"ln1 epsilons differ across layers ({eps} and {eps_l})"
        eps = eps_l
        weight = getattr(ln1, "weight", None)
        if weight is None:
            weight = getattr(ln1, "w", None)
        gamma = torch.ones(x.shape[-1], device=x.device) if weight is None else weight.detach().float()
        if getattr(ln1, "uses_weight_offset", False):
            gamma = 1.0 + gamma
        # one VJP of the real module with a fixed pseudo-random cotangent, over every row of this run
        u = torch.randn(x.shape, generator=torch.Generator().manual_seed(l)).to(device=x.device, dtype=x.dtype)
        xr = x.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                out = ln1(xr)
                (want,) = torch.autograd.grad(out, xr, u.to(out.dtype))
        except Exception as exc:  # an exotic module: report, never guess
            return None, f"autograd through blocks.{l}.ln1 failed ({type(exc).__name__}: {exc})"
        got = norm_vjp(x.float(), gamma * u.float(), norm, eps)
        err, scale = float((got - want.float()).abs().max()), float(want.abs().max())
        tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 5e-2
        if not err <= tol * max(scale, 1e-30):
            return None, (
                f"blocks.{l}.ln1 is not {norm}(eps={eps}) with weight {'1 + w' if getattr(ln1, 'uses_weight_offset', False) else 'w'}: "
                f"its autograd VJP differs from the analytic one by {err:.3g} (scale {scale:.3g})"
            )
        gammas.append(gamma)
    return (norm, torch.stack(gammas), float(eps)), ""


@dataclass(frozen=True)
class _EdgeHooks:
    """The hook points of edge attribution, in the order of the writer and reader axes."""

    writers: List[str]  # hook_embed, every layer's hook_z, every layer's hook_mlp_out
    ln1: List[str]  # each block's ln1 input: the residual the Q/K/V readers normalise
    qkv: List[str]  # per layer: hook_q, hook_k, hook_v
    mlp: List[str]  # each block's ln2 input: the MLP reader
    readers: List[str]  # qkv + mlp + ln_final.hook_in (the logits reader)

    @classmethod
    def of(cls, n_layers: int) -> "_EdgeHooks":
        qkv = [f"blocks.{l}.attn.hook_{c}" for l in range(n_layers) for c in QKV]
        mlp = [f"blocks.{l}.ln2.hook_in" for l in range(n_layers)]
        return cls(
            writers=["hook_embed"]
            + [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
            + [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)],
            ln1=[f"blocks.{l}.ln1.hook_in" for l in range(n_layers)],
            qkv=qkv,
            mlp=mlp,
            readers=qkv + mlp + ["ln_final.hook_in"],
        )


def _writes(model: Any, clean: Dict[str, Tensor], corrupted: Dict[str, Tensor]) -> Float[Tensor, "writer batch pos d_model"]:
    """Every writer's clean-minus-corrupted write to the residual stream, at least float32: the
    embedding, each head's ``dz @ W_O[h]``, each MLP's output. ``clean``: the patched-in activations
    (a clean run's, or a source's; ``[1, ...]`` broadcasts over the batch)."""
    n_layers = int(model.cfg.n_layers)
    dtype = score_dtype(clean["hook_embed"])
    W_O = torch.stack([model.blocks[l].attn.W_O.detach() for l in range(n_layers)]).to(dtype)  # [L, H, d_head, d_model]
    dz = torch.stack([difference(clean[f"blocks.{l}.attn.hook_z"], corrupted[f"blocks.{l}.attn.hook_z"]) for l in range(n_layers)])
    heads = torch.einsum("lbphe,lhed->lhbpd", dz, W_O)  # dz: [L, b, p, H, d_head]
    mlps = torch.stack([difference(clean[f"blocks.{l}.hook_mlp_out"], corrupted[f"blocks.{l}.hook_mlp_out"]) for l in range(n_layers)])
    embed = difference(clean["hook_embed"], corrupted["hook_embed"])
    return torch.cat([embed[None], torch.cat([heads, mlps[:, None]], dim=1).flatten(0, 1)])


def _embedding_ig_runs(
    model: Any,
    corrupted_tokens: Tensor,
    metric: MetricFn,
    hooks: _EdgeHooks,
    clean: Dict[str, Tensor],
    corrupted: Dict[str, Tensor],
    ig_steps: int,
    rule: str,
) -> Iterator[Tuple[Dict[str, Tensor], Dict[str, Tensor]]]:
    """``(reader gradients, ln1 inputs)`` of each EAP-IG step: the corrupted run with its token
    embedding set to ``corrupted + alpha * (clean - corrupted)``. One run at a time, so only one
    step's gradients are held."""
    e_corr = corrupted["hook_embed"].to(score_dtype(clean["hook_embed"]))
    e_delta = difference(clean["hook_embed"], corrupted["hook_embed"])
    for alpha in ig_alphas(ig_steps, rule):
        record: Dict[str, Tensor] = {}
        grad = gradients(model, corrupted_tokens, metric, hooks.readers + hooks.ln1 + ["hook_embed"], "scalar",
                         values={"hook_embed": e_corr + alpha * e_delta}, record=record)
        yield grad, record


class _EdgeContraction:
    """One run's reader gradients -> ``[n_writers, n_readers]`` scores (``[n_writers, n_readers,
    pos]`` with ``per_position``; before the validity mask), against fixed clean-minus-corrupted ``writes``.

    The Q/K/V readers' norm is settled once, at construction, on the corrupted run's ln1 inputs
    ``resid``: the analytic LayerNorm/RMSNorm VJP for :func:`qkv_edge_scores` where it matches
    autograd through the model's ``ln1`` (:func:`_ln1_spec`), else the VJP of ``ln1`` itself.
    """

    def __init__(
        self, model: Any, hooks: _EdgeHooks, backend: str, writes: Tensor, resid: List[Tensor], per_position: bool
    ):
        self.model, self.hooks, self.backend, self.writes = model, hooks, backend, writes
        self.per_position = per_position
        self.dtype = writes.dtype
        self.n_layers = int(model.cfg.n_layers)
        self.norm: Optional[Tuple[str, Tensor, float]] = None  # None: autograd through ln1
        if backend != "autograd":
            self.norm, reason = _ln1_spec(model, resid)
            if self.norm is None and backend == "triton":
                raise ValueError(f"backend='triton' needs LayerNorm/RMSNorm pre-attention norms: {reason}")

    def scores(self, grad: Dict[str, Tensor], record: Dict[str, Tensor]) -> Float[Tensor, "writer reader *pos"]:
        """Scores from one run's reader gradients ``grad`` and its ln1 inputs in ``record``."""
        p = "p" if self.per_position else ""
        s_qkv = self._qkv([record[n] for n in self.hooks.ln1], grad)  # [W, L, qkv readers, *pos]
        g_mlp = torch.stack([grad[n] for n in self.hooks.mlp]).to(self.dtype)
        s_mlp = torch.einsum(f"wbpd,lbpd->wl{p}", self.writes, g_mlp)  # [W, L, *pos]
        s_logits = torch.einsum(f"wbpd,bpd->w{p}", self.writes, grad["ln_final.hook_in"].to(self.dtype))  # [W, *pos]
        return torch.cat([torch.cat([s_qkv, s_mlp[:, :, None]], dim=2).flatten(1, 2), s_logits[:, None]], dim=1)

    def _qkv(self, resid: List[Tensor], grad: Dict[str, Tensor]) -> Float[Tensor, "writer layer reader *pos"]:
        """Readers per layer: the query heads, then the K heads, then the V heads (K/V heads on
        grouped-query models)."""
        model, dtype, n_layers = self.model, self.dtype, self.n_layers
        per_layer = [[grad[f"blocks.{l}.attn.hook_{c}"] for c in QKV] for l in range(n_layers)]
        if self.norm is None:  # the VJP of the model's own ln1, via autograd
            g_qkv = torch.stack([_qkv_input_grads(model, l, resid[l], per_layer[l]) for l in range(n_layers)]).to(dtype)
            p = "p" if self.per_position else ""
            return torch.einsum(f"wbpd,lrbpd->wlr{p}", self.writes, g_qkv)  # g_qkv: [L, readers, b, p, d_model]
        norm, gamma, eps = self.norm
        n_w, b, n_pos, d = self.writes.shape
        # [L, readers, b, p, d_head]: each component's heads [b, p, heads, d_head] moved to the front
        g = torch.stack([torch.cat([gc.movedim(2, 0) for gc in gs]) for gs in per_layer]).to(dtype)
        attn = [model.blocks[l].attn for l in range(n_layers)]
        W = torch.stack([torch.cat([a.W_Q, a.W_K, a.W_V]) for a in attn]).detach().to(dtype)  # [L, readers, d, d_head]
        x = torch.stack([r.to(dtype) for r in resid])  # [L, b, p, d_model]
        gamma = gamma.to(device=x.device, dtype=dtype)

        def contract(writes: Tensor, g: Tensor, x: Tensor) -> Tensor:  # rows flattened: [W, L, readers]
            return qkv_edge_scores(
                writes.reshape(n_w, -1, d), g.flatten(2, 3), W, x.flatten(1, 2), gamma, norm=norm, eps=eps,
                backend=self.backend,
            ).to(dtype)

        if not self.per_position:
            return contract(self.writes, g, x)
        # one contraction per position: its rows are the prompts at that position
        return torch.stack(
            [contract(self.writes[:, :, i : i + 1], g[:, :, :, i : i + 1], x[:, :, i : i + 1]) for i in range(n_pos)], dim=-1
        )


def get_attr_patch_edges(
    model: Any, clean_tokens: Optional[Tokens], corrupted_tokens: Optional[Tokens], patching_metric: MetricFn,
    *, backend: str = "auto", ig_steps: Optional[int] = None, rule: str = "midpoint", per_position: bool = False,
    source: Optional[Mapping[str, Tensor]] = None, direction: str = "denoising",
) -> EdgeScores:
    """First-order edge attribution of every writer -> reader edge (see the module docstring).

    ``patching_metric(logits)`` returns a 0-d tensor (e.g. the batch mean of a per-prompt
    quantity). One clean forward, one corrupted forward and one backward for the whole batch.

    ``backend`` picks how the Q/K/V readers' scores are contracted
    (:func:`fastpatch.ops.edge_scores.qkv_edge_scores`): ``"auto"`` (the fused Triton kernel on
    CUDA in bf16/fp16, the chunked PyTorch path elsewhere, fp32 included), ``"torch"``, ``"triton"``, or ``"autograd"`` (the
    VJP of each block's own ``ln1`` module, materialising ``[n_layers, 3, n_heads, batch, pos,
    d_model]``). The first three use the analytic LayerNorm/RMSNorm VJP, checked against autograd
    through the model's ``ln1`` at this corrupted run's ``ln1`` inputs before use; where it does not apply (another norm or
    convention) ``"triton"`` raises ``ValueError`` and ``"auto"``/``"torch"`` use ``"autograd"``.

    ``ig_steps`` (EAP-IG; Hanna et al. 2024, "Have Faith in Faithfulness"): the reader gradients
    are averaged over ``ig_steps`` runs of the corrupted prompt whose token embedding
    (``hook_embed``) is set to ``corrupted + alpha * (clean - corrupted)``, alpha at the midpoints
    ``(k + 0.5) / ig_steps`` (``rule="midpoint"``) or the left points ``k / ig_steps``
    (``rule="left"``; with ``ig_steps=1`` that is the plain estimate), as
    ``fastpatch.attribution.get_attr_patch_ig``. Position embeddings are equal in both runs, so the
    embedding is the whole input difference. Each step's Q/K/V gradients are taken through the norm
    at that step's own residual, so the per-step scores are averaged (a score is linear in the
    reader gradient), and contracted with the same clean-minus-corrupted writes. The embedding's
    outgoing scores then sum to a midpoint-rule quadrature of ``metric(clean) - metric(corrupted)``
    (error ``O(1 / ig_steps^2)``). Cost: a clean and a corrupted forward, plus ``ig_steps``
    forward+backward passes.

    ``per_position``: one edge per position ``p`` (the writer's write at ``p`` into the reader at
    ``p``; scores ``[n_writers, n_readers, pos]``, TransformerLens's per-position edges, the PEAP
    granularity); summed over positions they are the default scores. Positions where the prompts
    agree have no write difference, so their scores are exactly 0.

    Grouped-query models: each K/V reader is a K/V head (``"L{l}KV{g}.k"``), the input its
    projection reads, shared by the query heads of its group (see ``fastpatch.engine.direct_path``).

    With ``source=`` the writes are the source's writer outputs (``hook_embed``, each layer's
    ``attn.hook_z`` and ``hook_mlp_out``) minus the patched run's; ``ig_steps`` is then refused
    (a source cache is not a run on tokens, so there is no embedding to interpolate towards).
    With ``direction="noising"`` the gradients are taken at the clean run and the writes are the
    corrupted run's (or ``source``'s) minus the clean run's.
    """
    runs = _check(model, clean_tokens, corrupted_tokens, source, direction, backend, ig_steps, rule)
    if not isinstance(per_position, bool):
        raise ValueError(f"per_position must be True or False, got {per_position!r}")
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    hooks = _EdgeHooks.of(n_layers)
    with preserved_model_state(model):
        if ig_steps is None:
            # One probed corrupted forward and backward (the writers' and ln1 inputs are only
            # recorded; their zero probes change nothing), then the clean forward last, as in nodes.py.
            corrupted: Dict[str, Tensor] = {}
            names = hooks.readers + hooks.writers + hooks.ln1
            grad = gradients(model, runs.target, patching_metric, names, "scalar", record=corrupted)
            clean = patch_values(model, runs, hooks.writers)
            passes: Iterable[Tuple[Dict[str, Tensor], Dict[str, Tensor]]] = [(grad, corrupted)]
        else:
            corrupted = capture(model, runs.target, hooks.writers + hooks.ln1)
            clean = patch_values(model, runs, hooks.writers)
            passes = _embedding_ig_runs(model, runs.target, patching_metric, hooks, clean, corrupted, ig_steps, rule)
        resid = [corrupted[n] for n in hooks.ln1]
        contraction = _EdgeContraction(model, hooks, backend, _writes(model, clean, corrupted), resid, per_position)
        # a score is linear in its run's reader gradients, so the runs' scores are averaged
        per_run = (contraction.scores(grad, record) for grad, record in passes)
        scores = functools.reduce(operator.add, per_run) / (ig_steps or 1)
    layout = edge_layout(cfg)
    valid = valid_edges(cfg, layout, scores.device)
    scores = torch.where(valid if scores.ndim == 2 else valid[:, :, None], scores, torch.zeros_like(scores))
    return EdgeScores(scores=scores, valid=valid, writer_names=layout.writer_names, reader_names=layout.reader_names)


get_attr_patch_edges.__doc__ += SOURCE_DOC
