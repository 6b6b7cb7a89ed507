"""A functional transformer forward from a TransformerLens model's standard weights.

Supports LayerNorm and RMSNorm (with or without weights, Gemma's ``(1 + w)``), learned and rotary
(full or partial, half-split) positions, grouped-query attention, GELU/SiLU/ReLU and gated MLPs,
Mixtral-style mixture-of-experts MLPs, sequential and parallel attention+MLP blocks (with a
norm of their own or one shared norm), pre- and post-norms (Gemma 2/3, OLMo 2), QK-norm,
sliding-window layers, attention and output-logit soft-capping and a scaled embedding. It can
start at any block from a cached residual, attend over a cached K/V prefix, and stop before the
unembedding. Anything it does not implement is either refused up front
(``UnsupportedModel``) or caught by the parity check (``ParityError``) against the model's own
forward and hook values on the caller's tokens: it never returns a wrong number silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from fastpatch.ops.norms import linearised_norm_delta, normalize


class UnsupportedModel(ValueError):
    """The model has a feature the native forward does not implement."""


class ParityError(ValueError):
    """The native forward disagrees with the model's own forward."""


_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}

# Config features with a non-default value that the native forward does not implement.
# (cfg.use_qk_norm is not one: QK-norm is read from the attention's q_norm / k_norm modules.)
_UNSUPPORTED_FLAGS = {
    "use_normalization_before_and_after": False,
    "post_embedding_ln": False,
    "attn_only": False,
    "rotary_adjacent_pairs": False,
    "scale_attn_by_inverse_layer_idx": False,
    "use_local_attn": False,
}


@dataclass
class Layer:
    """One block's weights, in TransformerLens's layouts."""

    ln1_w: Optional[Tensor]  # None: the block has no pre-attention norm (post-norm blocks, OLMo 2)
    ln1_b: Optional[Tensor]
    ln2_w: Optional[Tensor]  # parallel blocks with one shared norm: ln1's weights
    ln2_b: Optional[Tensor]
    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor  # [n_kv_heads, d_model, d_head]
    W_V: Tensor
    W_O: Tensor  # [n_heads, d_head, d_model]
    b_Q: Optional[Tensor]
    b_K: Optional[Tensor]
    b_V: Optional[Tensor]
    b_O: Optional[Tensor]
    W_in: Optional[Tensor]  # [d_model, d_mlp]; None for a mixture of experts
    W_gate: Optional[Tensor]
    W_out: Optional[Tensor]  # [d_mlp, d_model]
    b_in: Optional[Tensor]
    b_out: Optional[Tensor]
    b_gate: Optional[Tensor] = None
    # norms of the attention output and the MLP output before the residual add (Gemma 2/3, OLMo 2)
    ln1_post_w: Optional[Tensor] = None
    ln1_post_b: Optional[Tensor] = None
    ln2_post_w: Optional[Tensor] = None
    ln2_post_b: Optional[Tensor] = None
    # QK-norm (RMS) of q and k before rotary: [d_head] per head, or [heads * d_head] over all heads (OLMo 2)
    q_norm_w: Optional[Tensor] = None
    k_norm_w: Optional[Tensor] = None
    qk_norm_eps: float = 0.0
    window: Optional[int] = None  # sliding-window layer: a query sees the last ``window`` keys
    moe: Optional["MoE"] = None
    # Q, K and V projections fused into one [d_model, (n_heads + 2 n_kv_heads) d_head] matmul,
    # and W_O flattened to [n_heads d_head, d_model]: a few large GEMMs instead of einsums.
    W_QKV: Tensor = field(init=False)
    b_QKV: Optional[Tensor] = field(init=False)
    W_O_flat: Tensor = field(init=False)

    def __post_init__(self) -> None:
        ws = [W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in (self.W_Q, self.W_K, self.W_V)]
        self.W_QKV = torch.cat(ws, dim=1).contiguous()
        biases = [self.b_Q, self.b_K, self.b_V]
        if all(b is None for b in biases):
            self.b_QKV = None
        else:
            shapes = [W.shape[0] * W.shape[2] for W in (self.W_Q, self.W_K, self.W_V)]
            self.b_QKV = torch.cat(
                [b.reshape(-1) if b is not None else self.W_Q.new_zeros(n) for b, n in zip(biases, shapes)]
            )
        self.W_O_flat = self.W_O.reshape(-1, self.W_O.shape[-1]).contiguous()


@dataclass
class MoE:
    """A Mixtral-style mixture of experts: softmax router, top-k experts renormalised, gated experts."""

    router: Tensor  # [d_model, n_experts]
    W_gate: Tensor  # [n_experts, d_model, d_mlp]
    W_in: Tensor  # [n_experts, d_model, d_mlp]
    W_out: Tensor  # [n_experts, d_mlp, d_model]
    top_k: int


@dataclass
class Trace:
    """Every activation of a full forward, per layer, in the hook layouts (batch first)."""

    resid_pre: List[Tensor] = field(default_factory=list)  # [batch, pos, d_model]
    q: List[Tensor] = field(default_factory=list)  # [batch, pos, n_heads, d_head], before rotary
    k: List[Tensor] = field(default_factory=list)  # [batch, pos, n_kv_heads, d_head], before rotary
    v: List[Tensor] = field(default_factory=list)
    k_rot: List[Tensor] = field(default_factory=list)  # keys as attention sees them
    pattern: List[Tensor] = field(default_factory=list)  # [batch, n_heads, dest, src]
    # layer -> [batch, n_heads, dest, src] pre-softmax scores, computed only when a score patch needs them
    attn_scores: Dict[int, Tensor] = field(default_factory=dict)
    z: List[Tensor] = field(default_factory=list)  # [batch, pos, n_heads, d_head]
    attn_out: List[Tensor] = field(default_factory=list)
    resid_mid: List[Tensor] = field(default_factory=list)  # sequential blocks only
    mlp_out: List[Tensor] = field(default_factory=list)
    # [batch, pos, d_mlp] mlp.hook_post (act(gate) * up for gated MLPs); None for a mixture of experts
    post: List[Optional[Tensor]] = field(default_factory=list)
    resid_final: Optional[Tensor] = None  # resid_post of the last block
    logits: Optional[Tensor] = None  # [batch, pos, d_vocab]: the positions ``logit_positions``
    logit_positions: slice = field(default_factory=lambda: slice(None))
    # shape (without batch) of every hook point that fired in the model's own run (the parity
    # run of ``NativeModel.checked``): the plans validate their hooks with it instead of a probe forward
    hook_shapes: Dict[str, tuple] = field(default_factory=dict)

    def hook_values(self, parallel: bool) -> Dict[str, Tensor]:
        """The trace under the model's hook names, in forward order (the parity check reports the
        earliest hook that disagrees, where the missing feature acts), logits last."""
        out = {}
        for l in range(len(self.resid_pre)):
            out[f"blocks.{l}.hook_resid_pre"] = self.resid_pre[l]
            for name in ("q", "k", "v", "pattern", "z"):
                out[f"blocks.{l}.attn.hook_{name}"] = getattr(self, name)[l]
            out[f"blocks.{l}.hook_attn_out"] = self.attn_out[l]
            if not parallel:
                out[f"blocks.{l}.hook_resid_mid"] = self.resid_mid[l]
            if l < len(self.post) and self.post[l] is not None:
                out[f"blocks.{l}.mlp.hook_post"] = self.post[l]
            out[f"blocks.{l}.hook_mlp_out"] = self.mlp_out[l]
        if self.logits is not None:
            out["logits"] = self.logits
        return out


def _matmul(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``x @ w (+ b)`` for ``x`` ``[..., k]``, ``w`` ``[k, n]``: one 2-D GEMM over all leading
    axes. A strided ``x`` (e.g. positions sliced from a longer run) is copied once rather than
    left to ``matmul``, which would broadcast ``w`` into a batched GEMM over the first axis."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if b is None else torch.addmm(b, flat, w)
    return out.view(*x.shape[:-1], w.shape[-1])


def _grouped_matmul(x: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """``[rows, k] -> [rows, n]``: rows ``ends[g-1]:ends[g]`` of ``x`` times ``w[g]`` (``w``
    ``[groups, k, n]``, ``ends`` the cumulative group sizes on ``x``'s device). One grouped GEMM
    where torch has it for the dtype (no host read on CPU); else one host read of ``ends`` and a
    matmul per non-empty group."""
    if hasattr(F, "grouped_mm") and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return F.grouped_mm(x, w, offs=ends.to(torch.int32))
    out = x.new_empty(x.shape[0], w.shape[-1])
    begin = 0
    for g, end in enumerate(ends.tolist()):
        if end > begin:
            torch.matmul(x[begin:end], w[g], out=out[begin:end])
        begin = end
    return out


def _weight(module: Any, name: str) -> Optional[Tensor]:
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, Tensor) else None


# Hugging Face activation modules by class name (what the model's MLP really applies: Falcon's
# config says relu where its MLP runs GELU)
_ACTIVATION_MODULES = {
    "GELUActivation": "gelu", "GELU": "gelu", "NewGELUActivation": "gelu_new", "GELUTanh": "gelu_pytorch_tanh",
    "PytorchGELUTanh": "gelu_pytorch_tanh", "FastGELUActivation": "gelu_fast", "SiLUActivation": "silu", "SiLU": "silu",
    "ReLU": "relu", "BloomGelu": "gelu_new",
}


def _module_activation(model: Any) -> Optional[str]:
    """The activation of the first block's Hugging Face MLP module, if it names one we know."""
    hf_mlp = getattr(model.blocks[0].mlp, "original_component", None)
    for attr in ("act", "act_fn", "activation_fn", "activation", "gelu_impl"):
        module = getattr(hf_mlp, attr, None)
        if isinstance(module, torch.nn.Module):
            name = type(module).__name__
            if name == "GELU" and getattr(module, "approximate", "none") == "tanh":
                return "gelu_pytorch_tanh"
            return _ACTIVATION_MODULES.get(name)
    return None


def _sliding_window(hf_attn: Any, index: int) -> Optional[int]:
    """The sliding window of one layer's Hugging Face attention (``None``: global): its own
    ``sliding_window`` (Gemma 2/3, Qwen2), else its config's for a sliding layer or a model
    without per-layer types (Mistral)."""
    if hf_attn is None:
        return None
    if hasattr(hf_attn, "sliding_window"):
        window = hf_attn.sliding_window
    else:
        config = getattr(hf_attn, "config", None)
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is not None and types[index] != "sliding_attention":
            window = None
        if getattr(config, "use_sliding_window", True) is False:
            window = None
    return int(window) if window else None


def fired_hook_shapes(model: Any, cache: Any) -> Dict[str, tuple]:
    """Activation shapes (without batch) of every hook point that fired in the run that filled
    ``cache`` (a ``run_with_cache`` of every hook): what ``probing.probe_hooks`` would find, with
    no forward of its own. A hook point is in such a cache exactly when it fired."""
    return {name: tuple(cache[name].shape[1:]) for name in model.hook_dict if name in cache}


def parity_measures(pairs: List[tuple], device: torch.device) -> tuple:
    """``(errors, scales)``: for each ``(ours, theirs)`` pair, ``max |ours - theirs|`` (in fp32)
    and ``max |theirs|`` (in ``theirs``' dtype), as Python floats, read back in ONE transfer.

    The values are exactly those of ``float(...)`` on each reduction: they are stacked in
    float64, which holds every fp32/fp16/bf16/fp64 value exactly (float32 on MPS, which has no
    float64 and no float64 models either).
    """
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    errors = torch.stack([(ours.float() - theirs.float()).abs().max().to(device) for ours, theirs in pairs])
    scales = [theirs.abs().max().to(device) for _, theirs in pairs]
    if len({s.dtype for s in scales}) > 1:
        scales = [s.to(wide) for s in scales]
    values = torch.cat([errors.to(wide), torch.stack(scales).to(wide)]).tolist()  # the one host read-back
    return values[: len(pairs)], values[len(pairs) :]


class NativeModel:
    """The functional forward of one TransformerLens model."""

    def __init__(self, model: Any):
        cfg = model.cfg
        for flag, default in _UNSUPPORTED_FLAGS.items():
            if bool(getattr(cfg, flag, default)) != default:
                raise UnsupportedModel(f"the native backend does not implement cfg.{flag}={getattr(cfg, flag)}")
        # soft caps (Gemma 2): cap * tanh(x / cap) of the attention scores and of the logits
        self.attn_cap, self.logit_cap = (float(getattr(cfg, f, -1.0) or -1.0) for f in ("attn_scores_soft_cap", "output_logits_soft_cap"))
        if getattr(cfg, "attention_dir", "causal") != "causal":
            raise UnsupportedModel("the native backend needs causal attention")
        self.norm = cfg.normalization_type
        if self.norm not in ("LN", "RMS"):
            raise UnsupportedModel(f"the native backend does not implement normalization_type={self.norm!r}")
        self.positions = cfg.positional_embedding_type
        if self.positions not in ("standard", "rotary", "alibi"):
            raise UnsupportedModel(f"the native backend does not implement {self.positions!r} positions")
        act_fn = _module_activation(model) or cfg.act_fn
        if act_fn not in _ACTIVATIONS:
            raise UnsupportedModel(f"the native backend does not implement act_fn={act_fn!r}")
        self.act = _ACTIVATIONS[act_fn]
        self.eps = float(cfg.eps)
        # Gemma's RMSNorm scales by (1 + w): its weights are read as 1 + w
        self.norm_offset = self.norm == "RMS" and bool(getattr(cfg, "rmsnorm_uses_offset", False))
        self.qk_norm_after_rope = bool(getattr(cfg, "qk_norm_after_rope", False))
        self.parallel = bool(cfg.parallel_attn_mlp)
        self.gated = bool(cfg.gated_mlp)
        self.n_layers, self.n_heads, self.d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        attn_scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        self.attn_scale = attn_scale if attn_scale > 0 else math.sqrt(self.d_head)
        if not getattr(cfg, "use_attn_scale", True):
            self.attn_scale = 1.0
        try:
            self.W_E = model.W_E.detach()
            self.d_model = int(self.W_E.shape[1])
            self.layers = [self._layer(block, l) for l, block in enumerate(model.blocks)]
            self.W_pos = model.W_pos.detach() if self.positions == "standard" else None
            self.W_U = model.W_U.detach()
            self.b_U = _weight(model, "b_U")
            self.lnf_w, self.lnf_b = self._norm_weights(model.ln_final)
            # BLOOM normalises the embedding before the first block
            self.embed_ln_w, self.embed_ln_b = self._norm_weights(model._modules.get("embed_ln"))
            # Gemma multiplies the embedding by sqrt(d_model) (a buffer of its embedding module)
            scale = getattr(getattr(model.embed, "original_component", None), "embed_scale", None)
            self.embed_scale = scale.detach().to(self.W_E.dtype) if isinstance(scale, Tensor) else None
        except (AttributeError, TypeError) as error:
            raise UnsupportedModel(f"the model does not expose TransformerLens-standard weights: {error}") from None
        if self.lnf_w is None:
            raise UnsupportedModel("the model has no final norm")
        # the attention's own score scale where the Hugging Face module states it (Gemma's query_pre_attn_scalar)
        scalings = {getattr(getattr(block.attn, "original_component", None), "scaling", None) for block in model.blocks}
        if len(scalings) == 1 and isinstance(next(iter(scalings)), float):
            self.attn_scale = 1.0 / next(iter(scalings))
        elif len(scalings) > 1:
            raise UnsupportedModel(f"per-layer attention scales {sorted(map(str, scalings))}")
        first = self.layers[0]
        self.d_mlp = int(first.moe.W_in.shape[-1] if first.moe is not None else first.W_in.shape[1])
        self.rotary: Optional[List[tuple]] = None  # per layer (cos, sin): [pos, rotary_dim]
        self.rotary_pairs = "half"  # which dimensions rotate together: the two halves, or adjacent pairs (GPT-J)
        self.alibi: Optional[Tensor] = None  # ALiBi (BLOOM): [n_heads, pos] score bias of each key position
        self._future_masks: Dict[tuple, Tensor] = {}  # (n_keys, window, device) -> [n_keys, n_keys] hidden keys

    def _norm_weights(self, ln: Any) -> tuple:
        """``(w, b)`` of a norm as the forward applies it: ``(None, None)`` where there is no norm,
        ones where it has no weight (OLMo's LayerNorm), ``1 + w`` for Gemma's RMSNorm."""
        if ln is None:
            return None, None
        w = _weight(ln, "w")
        if w is None:
            w = self.W_E.new_ones(self.d_model)
        elif self.norm_offset:
            w = 1.0 + w.float()
        return w, (_weight(ln, "b") if self.norm == "LN" else None)

    def _layer(self, block: Any, index: int) -> Layer:
        attn, mlp = block.attn, block.mlp
        modules = block._modules
        if modules.get("ln1") is None and modules.get("ln1_post") is None:
            raise UnsupportedModel(f"blocks.{index} has neither a pre- nor a post-attention norm")
        ln1_w, ln1_b = self._norm_weights(modules.get("ln1"))
        # parallel blocks with one shared norm (Phi, GPT-J, Falcon): the MLP reads ln1's output
        shared = self.parallel and modules.get("ln2") is None and modules.get("ln2_post") is None
        ln2_w, ln2_b = (ln1_w, ln1_b) if shared else self._norm_weights(modules.get("ln2"))
        post1_w, post1_b = self._norm_weights(modules.get("ln1_post"))
        post2_w, post2_b = self._norm_weights(modules.get("ln2_post"))
        hf_attn = getattr(attn, "original_component", None)
        q_norm_w, k_norm_w, qk_eps = self._qk_norm(attn, index)
        moe = self._moe(mlp, index) if not hasattr(mlp, "W_in") else None
        return Layer(
            ln1_w=ln1_w, ln1_b=ln1_b, ln2_w=ln2_w, ln2_b=ln2_b,
            W_Q=attn.W_Q.detach(), W_K=attn.W_K.detach(), W_V=attn.W_V.detach(), W_O=attn.W_O.detach(),
            b_Q=_weight(attn, "b_Q"), b_K=_weight(attn, "b_K"), b_V=_weight(attn, "b_V"), b_O=_weight(attn, "b_O"),
            W_in=None if moe else mlp.W_in.detach(), W_gate=_weight(mlp, "W_gate") if self.gated and not moe else None,
            W_out=None if moe else mlp.W_out.detach(), b_in=_weight(mlp, "b_in"), b_out=_weight(mlp, "b_out"),
            b_gate=_weight(mlp, "b_gate") if self.gated and not moe else None,
            ln1_post_w=post1_w, ln1_post_b=post1_b, ln2_post_w=post2_w, ln2_post_b=post2_b,
            q_norm_w=q_norm_w, k_norm_w=k_norm_w, qk_norm_eps=qk_eps, window=_sliding_window(hf_attn, index), moe=moe,
        )

    def _qk_norm(self, attn: Any, index: int) -> tuple:
        """``(q_norm_w, k_norm_w, eps)`` of an attention with QK-norm (the bridge's ``q_norm`` /
        ``k_norm`` submodules, whatever ``cfg.use_qk_norm`` says), else ``(None, None, 0.0)``."""
        norms = [attn._modules.get(name) for name in ("q_norm", "k_norm")]
        if all(n is None for n in norms):
            return None, None, 0.0
        weights, eps = [], set()
        for name, norm in zip(("q_norm", "k_norm"), norms):
            hf = getattr(norm, "original_component", None)
            w = getattr(hf, "weight", None)
            if norm is None or not isinstance(w, Tensor) or not type(hf).__name__.endswith("RMSNorm"):
                raise UnsupportedModel(f"blocks.{index}.attn.{name} is not an RMSNorm with a weight")
            w = w.detach()
            weights.append(1.0 + w.float() if self.norm_offset else w)
            eps.add(float(getattr(hf, "variance_epsilon", getattr(hf, "eps", self.eps))))
        if len(eps) > 1:
            raise UnsupportedModel(f"blocks.{index}: q_norm and k_norm with different epsilons")
        if self.qk_norm_after_rope:
            raise UnsupportedModel("QK-norm after rotary")
        return weights[0], weights[1], eps.pop()

    def _moe(self, mlp: Any, index: int) -> "MoE":
        """A Mixtral-style sparse MoE block's router and per-expert weights, read from the model."""
        hf = getattr(mlp, "original_component", None)
        router, experts = getattr(hf, "gate", None), getattr(hf, "experts", None)
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        supported = (
            type(hf).__name__ == "MixtralSparseMoeBlock" and isinstance(getattr(router, "weight", None), Tensor)
            and isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3
            and not getattr(hf, "jitter_noise", 0.0)
        )
        if not supported:
            raise UnsupportedModel(f"blocks.{index}.mlp ({type(hf).__name__}) is not a Mixtral-style mixture of experts")
        act = type(getattr(experts, "act_fn", None)).__name__
        if act not in ("SiLUActivation", "SiLU"):
            raise UnsupportedModel(f"blocks.{index}.mlp: expert activation {act}")
        d_mlp = gate_up.shape[1] // 2
        # views of the model's own weights, not copies (hundreds of MB per call on a large model):
        # the matmuls read the transposed layouts as they are
        gate_up = gate_up.detach().transpose(1, 2)  # [experts, d_model, 2 d_mlp]: gate, then up
        return MoE(
            router=router.weight.detach().T, W_gate=gate_up[..., :d_mlp], W_in=gate_up[..., d_mlp:],
            W_out=down.detach().transpose(1, 2), top_k=int(hf.top_k),
        )

    # ---- pieces -------------------------------------------------------------------------------
    def normalize(self, x: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
        """The model's norm with weights ``w``, ``b``; ``w=None`` is a block without that norm."""
        return x if w is None else normalize(x, w, b, self.norm, self.eps)

    def _qk_normalize(self, x: Tensor, w: Optional[Tensor], eps: float) -> Tensor:
        """QK-norm of ``[..., heads, d_head]``: per head, or over all heads' values (OLMo 2's weight)."""
        if w is None:
            return x
        if w.shape[-1] == x.shape[-1]:
            return normalize(x, w, None, "RMS", eps)
        return normalize(x.flatten(-2), w, None, "RMS", eps).view_as(x)

    def rotate_q(self, layer: int, q: Tensor, start: int) -> Tensor:
        """Queries ``[rows, pos, n_heads, d_head]`` (from ``hook_q``) as attention reads them at
        positions ``start, ...``: QK-normed, then rotated."""
        L = self.layers[layer]
        return self._rotary(layer, self._qk_normalize(q, L.q_norm_w, L.qk_norm_eps), start)

    def rotate_k(self, layer: int, k: Tensor, start: int) -> Tensor:
        """Keys (from ``hook_k``) as attention reads them: QK-normed, then rotated."""
        L = self.layers[layer]
        return self._rotary(layer, self._qk_normalize(k, L.k_norm_w, L.qk_norm_eps), start)

    def _rotary(self, layer: int, x: Tensor, start: int) -> Tensor:
        """Rotary embedding of queries or keys ``[rows, pos, heads, d_head]`` at positions ``start, ...``
        (after QK-norm: callers go through ``rotate_q`` / ``rotate_k``)."""
        if self.rotary is None:
            return x
        cos, sin = self.rotary[layer]
        n = x.shape[1]
        cos, sin = cos[start : start + n, None, :], sin[start : start + n, None, :]
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        if self.rotary_pairs == "adjacent":  # GPT-J's rotate_every_two
            rotated = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
        else:
            half = r // 2
            rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)

    def qkv(self, layer: int, x_norm: Tensor):
        """q ``[..., n_heads, d_head]``, k and v ``[..., n_kv_heads, d_head]`` (before rotary)."""
        L = self.layers[layer]
        fused = _matmul(x_norm, L.W_QKV, L.b_QKV)
        nq, nkv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        q, k, v = fused.split([nq, nkv, nkv], dim=-1)
        lead = x_norm.shape[:-1]
        return (
            q.reshape(*lead, self.n_heads, self.d_head),
            k.reshape(*lead, self.n_kv_heads, self.d_head),
            v.reshape(*lead, self.n_kv_heads, self.d_head),
        )

    def attend(
        self, q_rot: Tensor, k_rot: Tensor, v: Tensor, q_start: int, layer: Optional[int] = None, heads: slice = slice(None)
    ) -> tuple:
        """Causal attention of queries at ``q_start..`` over keys at ``0..``; GQA by head groups;
        soft-capped scores, ALiBi and block ``layer``'s sliding window where the model has them.
        ``heads``: which of the model's query heads ``q_rot`` holds (for their ALiBi slopes).

        q_rot ``[rows, nq, heads, d_head]``; k_rot, v ``[rows, nk, kv_heads, d_head]``.
        Returns pattern ``[rows, heads, nq, nk]`` and z ``[rows, nq, heads, d_head]``.
        """
        pattern = self.scores(q_rot, k_rot, q_start, layer, heads).softmax(dim=-1)
        return pattern, self.mix_values(pattern, v)

    def mix_values(
        self, pattern: Float[Tensor, "rows heads nq nk"], v: Float[Tensor, "rows nk kv_heads d_head"]
    ) -> Float[Tensor, "rows nq heads d_head"]:
        """z ``[rows, nq, heads, d_head]`` of pattern ``[rows, heads, nq, nk]`` over v ``[rows, nk, kv_heads, d_head]``."""
        rows, n_heads, nq, nk = pattern.shape
        n_kv, d_head = v.shape[2], v.shape[3]
        z = torch.matmul(pattern.reshape(rows, n_kv, (n_heads // n_kv) * nq, nk), v.permute(0, 2, 1, 3))
        return z.view(rows, n_heads, nq, d_head).transpose(1, 2)

    def scores(
        self,
        q_rot: Float[Tensor, "rows nq heads d_head"],
        k_rot: Float[Tensor, "rows nk kv_heads d_head"],
        q_start: int,
        layer: Optional[int] = None,
        heads: slice = slice(None),
    ) -> Float[Tensor, "rows heads nq nk"]:
        """Pre-softmax scores ``[rows, heads, nq, nk]`` as the bridge's ``hook_attn_scores`` holds them: scaled,
        ALiBi added, soft-capped, then hidden keys (causal mask, sliding window) set to -inf (see ``attend``)."""
        rows, nq, n_heads, d_head = q_rot.shape
        nk, n_kv = k_rot.shape[1], k_rot.shape[2]
        group = n_heads // n_kv
        if layer is None and any(L.window is not None and L.window < nk for L in self.layers):
            raise UnsupportedModel("attention on a sliding-window model needs its layer")
        # GQA without repeating keys and values: the `group` query heads of one K/V head share its
        # matmul as extra rows ([rows, kv_heads, group * nq, d_head]); head h reads K/V head h // group
        q = q_rot.reshape(rows, nq, n_kv, group, d_head).permute(0, 2, 3, 1, 4).reshape(rows, n_kv, group * nq, d_head)
        scores = torch.matmul(q, k_rot.permute(0, 2, 3, 1)).view(rows, n_heads, nq, nk)  # fresh: edited in place
        scores.div_(self.attn_scale)
        if self.alibi is not None:  # slope * key position: softmax makes it slope * (key - query) distance
            scores.add_(self.alibi[heads, None, :nk])
        if self.attn_cap > 0:
            scores.div_(self.attn_cap).tanh_().mul_(self.attn_cap)
        window = None if layer is None else self.layers[layer].window
        hidden = self.future_mask(nq, nk, q_start, q_rot.device, window if window is not None and window < nk else None)
        return scores.masked_fill_(hidden, float("-inf"))

    def future_mask(self, nq: int, nk: int, q_start: int, device: torch.device, window: Optional[int] = None) -> Tensor:
        """``[nq, nk]``, True where key position ``k`` is hidden from query position ``q = q_start + i``:
        after it, or (a sliding window) at ``k <= q - window`` (Hugging Face's ``kv_idx > q_idx - window``).

        Built once per (number of keys, window, device) for this model (one forward's calls share
        it) and sliced by rows (a view): the query positions of a causal pass are at most the keys'.
        """

        def build(queries: Tensor, keys: Tensor) -> Tensor:
            hidden = keys[None, :] > queries[:, None]
            return hidden if window is None else hidden | (keys[None, :] <= queries[:, None] - window)

        if q_start + nq > nk:  # queries past the last key (not a causal pass here): built directly
            return build(torch.arange(q_start, q_start + nq, device=device), torch.arange(nk, device=device))
        key = (nk, window, torch.device(device))
        mask = self._future_masks.get(key)
        if mask is None:
            positions = torch.arange(nk, device=device)
            mask = self._future_masks[key] = build(positions, positions)
        return mask[q_start : q_start + nq]

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        """``[..., n_heads, d_head] -> [..., d_model]``: heads' outputs through W_O, summed."""
        L = self.layers[layer]
        out = _matmul(z.reshape(*z.shape[:-2], -1), L.W_O_flat, L.b_O)
        return self.normalize(out, L.ln1_post_w, L.ln1_post_b)

    def linearised_norm_delta(self, x: Tensor, delta: Tensor, w: Tensor) -> Tensor:
        """First-order change of ``normalize(x)`` with the scale frozen (see ``fastpatch.ops.norms``)."""
        return linearised_norm_delta(x, delta, w, self.norm, self.eps)

    def mlp(self, layer: int, x: Tensor, keep_post: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        L = self.layers[layer]
        return self.mlp_from_normalized(layer, self.normalize(x, L.ln2_w, L.ln2_b), keep_post)

    def mlp_from_normalized(self, layer: int, h: Tensor, keep_post: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        """The MLP (or mixture of experts) of block ``layer`` on its already normalised input,
        through the block's post-MLP norm where it has one. ``keep_post``, when given, receives the
        hidden activation ``[..., d_mlp]`` (``mlp.hook_post``: ``act(gate) * up`` when gated; not
        called for a mixture of experts, which has no single one)."""
        L = self.layers[layer]
        if L.moe is not None:
            return self.normalize(self.experts(L.moe, h), L.ln2_post_w, L.ln2_post_b)
        pre = _matmul(h, L.W_in, L.b_in)
        post = self.act(_matmul(h, L.W_gate, L.b_gate)).mul_(pre) if self.gated else self.act(pre)
        if keep_post is not None:
            keep_post(post)
        out = _matmul(post, L.W_out, L.b_out)
        return self.normalize(out, L.ln2_post_w, L.ln2_post_b)

    def experts(self, moe: MoE, h: Tensor) -> Tensor:
        """Mixtral's sparse MoE on ``[..., d_model]``, as Hugging Face computes it: softmax router in
        fp32, top-k experts with their weights renormalised, each expert on the tokens routed to it.

        Routing is per token (no capacity limit), so a token's output depends on its own input
        alone: batching cells and skipping unchanged positions cannot change it."""
        flat = h.reshape(-1, h.shape[-1])
        probs = (flat @ moe.router).float().softmax(dim=-1)
        weights, chosen = probs.topk(moe.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Every (token, expert) pair sorted by expert once per call: each expert's tokens are one
        # contiguous block, and all experts run as one grouped matmul (no host read per expert).
        # Within an expert the pairs stay in token order, and each token's top_k contributions are
        # added in expert order, as Hugging Face's loop over experts adds them.
        expert = chosen.reshape(-1)
        order = expert.argsort(stable=True)
        tokens = order // moe.top_k
        ends = torch.bincount(expert, minlength=moe.router.shape[1]).cumsum(0)
        x = flat[tokens]
        hidden = F.silu(_grouped_matmul(x, moe.W_gate, ends)).mul_(_grouped_matmul(x, moe.W_in, ends))
        y = _grouped_matmul(hidden, moe.W_out, ends) * weights.reshape(-1)[order, None]
        return torch.zeros_like(flat).index_add_(0, tokens, y.to(flat.dtype)).view_as(h)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.lnf_w, self.lnf_b)

    def unembed(self, x_norm: Tensor) -> Tensor:
        return self.cap_logits(_matmul(x_norm, self.W_U, self.b_U))

    def cap_logits(self, logits: Tensor) -> Tensor:
        """The output soft cap ``cap * tanh(logits / cap)`` (Gemma 2), in place; identity without one."""
        if self.logit_cap > 0:
            logits.div_(self.logit_cap).tanh_().mul_(self.logit_cap)
        return logits

    # ---- whole runs ---------------------------------------------------------------------------
    def trace(self, tokens: Int[Tensor, "batch pos"], logit_positions: slice = slice(None)) -> Trace:
        """The full forward of ``tokens`` with every activation kept; logits at ``logit_positions``
        only (all by default)."""
        t = Trace(logit_positions=logit_positions)
        x = self.W_E[tokens]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        x = self.normalize(x, self.embed_ln_w, self.embed_ln_b)
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        for l, L in enumerate(self.layers):
            t.resid_pre.append(x)
            q, k, v = self.qkv(l, self.normalize(x, L.ln1_w, L.ln1_b))
            k_rot = self.rotate_k(l, k, 0)
            pattern, z = self.attend(self.rotate_q(l, q, 0), k_rot, v, 0, l)
            attn_out = self.attn_out(l, z)
            for name, value in (("q", q), ("k", k), ("v", v), ("k_rot", k_rot), ("pattern", pattern), ("z", z), ("attn_out", attn_out)):
                getattr(t, name).append(value)
            t.post.append(None)
            keep_post = lambda post, l=l: t.post.__setitem__(l, post)  # noqa: E731
            if self.parallel:
                mlp_out = self.mlp(l, x, keep_post)
                x = x + attn_out + mlp_out
            else:
                mid = x + attn_out
                t.resid_mid.append(mid)
                mlp_out = self.mlp(l, mid, keep_post)
                x = mid + mlp_out
            t.mlp_out.append(mlp_out)
        t.logits = self.unembed(self.final_norm(x[:, logit_positions]))
        return t

    def check_parity(self, logits: Tensor, cache: Any, trace: Trace) -> None:
        """Refuse if the trace disagrees with the model's own logits or hook values.

        Tolerance: 1e-4 of each tensor's scale in fp32 (the two forwards differ only in the
        order of float reductions, ~1e-6), 5e-2 in half precision.

        Every checked tensor's error and scale are computed on the device and read back in one
        transfer; the tensors are then judged in order on the host, so the first one that
        disagrees (a shape mismatch, or an error above tolerance) is the one reported.
        """
        rtol = 1e-4 if logits.dtype == torch.float32 or logits.dtype == torch.float64 else 5e-2
        checks = {}
        for name, value in trace.hook_values(self.parallel).items():
            if name == "logits":
                checks[name] = (value, logits[:, trace.logit_positions])
            elif name in cache:  # a hook the model lacks is checked through the later ones
                checks[name] = (value, cache[name])
        # Shapes are known on the host: only the tensors before the first shape mismatch are read.
        names = list(checks)
        bad_shape = next((i for i, n in enumerate(names) if checks[n][0].shape != checks[n][1].shape), None)
        measured = names[:bad_shape] if bad_shape is not None else names
        if measured:
            errors, scales = parity_measures([checks[n] for n in measured], logits.device)
            for name, err, scale in zip(measured, errors, scales):
                scale = scale + 1e-6
                if not err <= rtol * scale:
                    raise ParityError(
                        f"native forward disagrees with the model at {name}: max abs error {err:.3g} "
                        f"(scale {scale:.3g}); the model has a feature the native backend does not implement"
                    )
        if bad_shape is not None:
            name = names[bad_shape]
            ours, theirs = checks[name]
            raise ParityError(f"native forward's {name} has shape {tuple(ours.shape)}, the model's {tuple(theirs.shape)}")

    @classmethod
    def checked(cls, model: Any, tokens: Tensor) -> "NativeEngine":
        """Build the native model, trace ``tokens`` and check parity with the model's own run."""
        native = cls(model)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
            if native.positions == "alibi":
                native.alibi = _alibi(model, native.n_heads, tokens.shape[1], logits.dtype)
            if native.positions == "rotary" and "blocks.0.attn.hook_cos" not in cache:
                native.rotary = _sinusoid_table_rotary(model, native.n_layers, tokens.shape[1])
                native.rotary_pairs = "adjacent"
            elif native.positions == "rotary":
                native.rotary = []
                for l in range(native.n_layers):
                    if f"blocks.{l}.attn.hook_cos" not in cache:
                        raise UnsupportedModel("rotary model without hook_cos/hook_sin: rotary angles unknown")
                    cos, sin = cache[f"blocks.{l}.attn.hook_cos"], cache[f"blocks.{l}.attn.hook_sin"]
                    native.rotary.append((cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0], sin.reshape(-1, sin.shape[-2], sin.shape[-1])[0]))
            # Logits at the last position only: the final norm, unembedding and soft cap act on each
            # position alone, and their input at every position is checked through the last block's
            # hooks; the full-vocabulary unembedding of every position is the check's largest matmul.
            trace = native.trace(tokens, logit_positions=slice(-1, None))
        native.check_parity(logits, cache, trace)
        own = native.trace_from_cache(cache, logits, trace)
        own.hook_shapes = fired_hook_shapes(model, cache)
        return NativeEngine(native, own)

    def trace_from_cache(self, cache: Any, logits: Tensor, native_trace: Trace) -> Trace:
        """The model's own activations in trace form (after the parity check has vouched for the
        native forward): unpatched positions, and the first-changed-position test against the
        clean cache, then use the model's numbers bit for bit, as TransformerLens's forwards do.

        A model without ``hook_pattern`` (e.g. OPT's attention) gets the checked native trace's
        pattern: it is only the start of pattern patches, which need that hook to fire anyway. Any
        other missing hook point is one the backend starts cells from: the model is unsupported.
        """

        def own(name: str, fallback: Optional[Tensor] = None) -> Tensor:
            if name in cache:
                return cache[name]
            if fallback is None:
                raise UnsupportedModel(f"the model's hook point {name} did not fire, and the native backend starts from it")
            return fallback

        t = Trace(logits=logits)
        for l in range(self.n_layers):
            for name, hook in (("resid_pre", "hook_resid_pre"), ("attn_out", "hook_attn_out"), ("mlp_out", "hook_mlp_out")):
                getattr(t, name).append(own(f"blocks.{l}.{hook}"))
            for name in ("q", "k", "v", "z"):
                getattr(t, name).append(own(f"blocks.{l}.attn.hook_{name}"))
            t.pattern.append(own(f"blocks.{l}.attn.hook_pattern", native_trace.pattern[l]))
            if not self.parallel:
                t.resid_mid.append(own(f"blocks.{l}.hook_resid_mid"))
            # mlp.hook_post: only metrics read it (a model whose hook does not fire has no such hook to read)
            post = native_trace.post[l] if l < len(native_trace.post) else None
            t.post.append(cache[f"blocks.{l}.mlp.hook_post"] if post is not None and f"blocks.{l}.mlp.hook_post" in cache else post)
            t.k_rot.append(self.rotate_k(l, t.k[l], 0))
        t.resid_final = own(f"blocks.{self.n_layers - 1}.hook_resid_post")
        return t


def _alibi(model: Any, n_heads: int, n_pos: int, dtype: torch.dtype) -> Tensor:
    """``[n_heads, n_pos]`` ALiBi bias, ``slope[h] * key position``, from the Hugging Face model's own
    ``build_alibi_tensor`` (BLOOM) for an unpadded prompt."""
    hf_model = getattr(model, "original_model", None)
    build = next((m.build_alibi_tensor for m in (hf_model.modules() if hf_model is not None else [])
                  if hasattr(m, "build_alibi_tensor")), None)
    if build is None:
        raise UnsupportedModel("ALiBi model without build_alibi_tensor: slopes unknown")
    device = model.W_E.device
    return build(torch.ones(1, n_pos, dtype=torch.long, device=device), n_heads, dtype).view(n_heads, n_pos)


def _sinusoid_table_rotary(model: Any, n_layers: int, n_pos: int) -> List[tuple]:
    """Per-layer ``(cos, sin)`` ``[n_pos, rotary_dim]`` of a GPT-J-style rotary embedding, which
    fires no hook_cos/hook_sin: read from its ``embed_positions`` table (``[sin | cos]`` halves),
    each angle repeated for the adjacent pair it rotates."""
    hf_model = getattr(model, "original_model", None)
    modules = hf_model.modules() if isinstance(hf_model, torch.nn.Module) else []
    tables = [m.embed_positions for m in modules if type(m).__name__ == "GPTJRotaryEmbedding"]
    if len(tables) != 1:
        raise UnsupportedModel("rotary model without hook_cos/hook_sin: rotary angles unknown")
    table = tables[0][:n_pos].detach()
    sin, cos = table.split(table.shape[-1] // 2, dim=-1)
    pair = (cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1))
    return [pair] * n_layers


class NativeEngine(NamedTuple):
    """What the native backend runs a plan on: the checked native model and the corrupted run's trace."""

    native: NativeModel
    trace: Trace
