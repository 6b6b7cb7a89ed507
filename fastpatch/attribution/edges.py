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
input gradients. Q/K/V inputs are read at TransformerLens's ``use_split_qkv_input`` fork
(``blocks.{l}.attn.hook_{q,k,v}_input``, ``[batch, pos, n_heads, d_model]``: one copy of the
residual per head and projection, so its gradient is that head's projection's alone), MLP inputs
at ``blocks.{l}.ln2.hook_in`` (the MLP's copy only; on parallel attention+MLP blocks too), the
logits at ``ln_final.hook_in``. The contraction is one einsum per reader type,
``[writers, batch, pos, d_model] x [readers, batch, pos, d_model] -> [writers, readers]``.

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

Refused, like TransformerLens: grouped-/multi-query attention (K/V inputs shared across query
heads) and models in training mode. The model is handed back with its hooks, flags and mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from fastpatch.attribution.nodes import _check_inputs, gradients
from fastpatch.engine.model_state import preserved_model_state

__all__ = ["EdgeScores", "get_attr_patch_edges"]

MetricFn = Callable[[Tensor], Tensor]
QKV = ("q", "k", "v")


@dataclass
class EdgeScores:
    """Edge attribution scores ``[n_writers, n_readers]`` with their names and validity mask.

    Writers: ``"embed"``, then per layer ``"L{l}H{h}"`` for every head and ``"MLP{l}"``.
    Readers: per layer ``"L{l}H{h}.q"`` for every head, then ``.k``, then ``.v``, then
    ``"MLP{l}.in"``; last ``"logits"``. ``scores`` is 0 wherever ``valid`` is ``False``.
    """

    scores: Tensor
    valid: Tensor
    writer_names: List[str]
    reader_names: List[str]

    def top_edges(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` valid edges with the largest ``|score|``: columns writer, reader, score."""
        w, r = torch.nonzero(self.valid, as_tuple=True)
        values = self.scores[w, r]
        order = torch.argsort(values.abs(), descending=True, stable=True)[:k]
        return pd.DataFrame(
            {
                "writer": [self.writer_names[int(i)] for i in w[order]],
                "reader": [self.reader_names[int(i)] for i in r[order]],
                "score": values[order].tolist(),
            }
        )

    def node_scores(self) -> pd.Series:
        """Each writer's outgoing edge scores summed over readers (TransformerLens's ``node_scores``
        of an edge sweep, summed over positions): its node attribution score, since a write reaches
        the metric only through the readers after it, the logits reader carrying the direct path."""
        return pd.Series(self.scores.sum(1).tolist(), index=self.writer_names, name="score")

    def to_frame(self) -> pd.DataFrame:
        """Every valid edge: writer, reader, score."""
        w, r = torch.nonzero(self.valid, as_tuple=True)
        return pd.DataFrame(
            {
                "writer": [self.writer_names[int(i)] for i in w],
                "reader": [self.reader_names[int(i)] for i in r],
                "score": self.scores[w, r].tolist(),
            }
        )


def _check(model: Any, clean_tokens: Any, corrupted_tokens: Any) -> None:
    _check_inputs(model, clean_tokens, corrupted_tokens, "scalar", "get_attr_patch_edges()")
    cfg = model.cfg
    kv = getattr(cfg, "n_key_value_heads", None)
    if kv is not None and kv != cfg.n_heads:
        raise ValueError(
            f"n_key_value_heads={kv} for n_heads={cfg.n_heads} (GQA/MQA): K/V inputs are shared across "
            "query heads, so a head's K/V reader is not its own; edge attribution is unsupported here"
        )


def _names(n_layers: int, n_heads: int) -> Tuple[List[str], List[str]]:
    writers = ["embed"]
    readers: List[str] = []
    for l in range(n_layers):
        writers += [f"L{l}H{h}" for h in range(n_heads)] + [f"MLP{l}"]
        readers += [f"L{l}H{h}.{c}" for c in QKV for h in range(n_heads)] + [f"MLP{l}.in"]
    return writers, readers + ["logits"]


def _valid_mask(n_layers: int, n_heads: int, parallel: bool, device: torch.device) -> Tensor:
    """``[n_writers, n_readers]``: the reader comes after the writer."""
    # writer layer and kind: embed = (-1, attn-like), head (l, 0), mlp (l, 1)
    w_layer, w_mlp = [-1], [False]
    for l in range(n_layers):
        w_layer += [l] * (n_heads + 1)
        w_mlp += [False] * n_heads + [True]
    r_layer, r_mlp = [], []
    for l in range(n_layers):
        r_layer += [l] * (3 * n_heads + 1)
        r_mlp += [False] * (3 * n_heads) + [True]
    r_layer.append(n_layers)  # logits: after everything
    r_mlp.append(False)
    wl, wm = torch.tensor(w_layer)[:, None], torch.tensor(w_mlp)[:, None]
    rl, rm = torch.tensor(r_layer)[None], torch.tensor(r_mlp)[None]
    strictly_later = rl > wl
    # a head feeds its own block's MLP on sequential blocks (the MLP reads attention's output)
    same_block_mlp = (rl == wl) & rm & ~wm & (wl >= 0) & (not parallel)
    return (strictly_later | same_block_mlp).to(device)


def _qkv_input_grads(model: Any, layer: int, resid: Tensor, grads: List[Tensor]) -> Tensor:
    """``[3, n_heads, batch, pos, d_model]``: d metric / d (the pre-norm residual copy each head's
    Q, K and V projection reads), from the gradients at ``hook_q/k/v`` ``[batch, pos, n_heads, d_head]``.

    Head ``h``'s Q is ``ln1(x) @ W_Q[h] + b_Q[h]`` (rotary, if any, comes after ``hook_q``), so the
    gradient at its own copy of ``x`` is ``J_ln1(x)^T (dq_h @ W_Q[h]^T)``: the vector-Jacobian
    product of the block's own ``ln1`` module, evaluated at the corrupted residual for all
    ``3 * n_heads`` cotangents at once. This is the gradient TransformerLens's
    ``use_split_qkv_input`` fork (``attn.hook_{q,k,v}_input``) reads, without the fork (which not
    every attention bridge has) and without touching the model's flags.
    """
    attn, ln1 = model.blocks[layer].attn, model.blocks[layer].ln1
    cot = torch.stack(
        [torch.einsum("bphe,hde->hbpd", g, W.detach().to(g.dtype)) for g, W in zip(grads, (attn.W_Q, attn.W_K, attn.W_V))]
    )  # [3, H, b, p, d_model]
    three, n_heads = cot.shape[:2]
    x = resid.detach()[None].expand(three * n_heads, *resid.shape).reshape(-1, *resid.shape[1:]).requires_grad_(True)
    with torch.enable_grad():
        out = ln1(x)
        (gx,) = torch.autograd.grad(out, x, cot.reshape(out.shape).to(out.dtype))
    return gx.detach().view(cot.shape)


def get_attr_patch_edges(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    patching_metric: MetricFn,
) -> EdgeScores:
    """First-order edge attribution of every writer -> reader edge (see the module docstring).

    ``patching_metric(logits)`` returns a 0-d tensor (e.g. the batch mean of a per-prompt
    quantity). One clean forward, one corrupted forward and one backward for the whole batch.
    """
    _check(model, clean_tokens, corrupted_tokens)
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))

    writer_hooks = ["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    writer_hooks += [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    ln1_hooks = [f"blocks.{l}.ln1.hook_in" for l in range(n_layers)]
    qkv_hooks = [f"blocks.{l}.attn.hook_{c}" for l in range(n_layers) for c in QKV]
    mlp_hooks = [f"blocks.{l}.ln2.hook_in" for l in range(n_layers)]
    reader_hooks = qkv_hooks + mlp_hooks + ["ln_final.hook_in"]

    clean: Dict[str, Tensor] = {}
    corrupted: Dict[str, Tensor] = {}

    def capture(name: str):
        def hook(tensor: Tensor, hook: Any) -> None:
            clean[name] = tensor.detach().clone()

        return hook

    with preserved_model_state(model):
        # One probed corrupted forward and backward (the writers' and ln1 inputs are only recorded;
        # their zero probes change nothing), then the clean forward last, as in nodes.py.
        probed = reader_hooks + writer_hooks + ln1_hooks
        grad = gradients(model, corrupted_tokens, patching_metric, probed, "scalar", record=corrupted)
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, capture(n)) for n in writer_hooks]):
            model(clean_tokens)
        g_qkv = torch.stack([_qkv_input_grads(model, l, corrupted[ln1_hooks[l]], [grad[f"blocks.{l}.attn.hook_{c}"] for c in QKV])
                             for l in range(n_layers)])  # [L, 3, H, b, p, d_model]

    dtype = torch.promote_types(clean["hook_embed"].dtype, torch.float32)
    grad = {n: g.to(dtype) for n, g in grad.items()}
    g_qkv = g_qkv.to(dtype)

    def diff(name: str) -> Tensor:
        return clean[name].to(dtype) - corrupted[name].to(dtype)

    # writers: [n_writers, batch, pos, d_model]
    W_O = torch.stack([model.blocks[l].attn.W_O.detach() for l in range(n_layers)]).to(dtype)  # [L, H, d_head, d_model]
    dz = torch.stack([diff(f"blocks.{l}.attn.hook_z") for l in range(n_layers)])  # [L, b, p, H, d_head]
    heads = torch.einsum("lbphe,lhed->lhbpd", dz, W_O)
    mlps = torch.stack([diff(f"blocks.{l}.hook_mlp_out") for l in range(n_layers)])  # [L, b, p, d]
    writers = torch.cat([diff("hook_embed")[None], torch.cat([heads, mlps[:, None]], dim=1).flatten(0, 1)])

    # readers, one einsum per type
    s_qkv = torch.einsum("wbpd,lchbpd->wlch", writers, g_qkv)  # [W, L, 3, H]
    s_mlp = torch.einsum("wbpd,lbpd->wl", writers, torch.stack([grad[n] for n in mlp_hooks]))  # [W, L]
    s_logits = torch.einsum("wbpd,bpd->w", writers, grad["ln_final.hook_in"])  # [W]
    scores = torch.cat([torch.cat([s_qkv.flatten(2), s_mlp[:, :, None]], dim=2).flatten(1), s_logits[:, None]], dim=1)

    valid = _valid_mask(n_layers, n_heads, parallel, scores.device)
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    writer_names, reader_names = _names(n_layers, n_heads)
    return EdgeScores(scores=scores, valid=valid, writer_names=writer_names, reader_names=reader_names)
