"""A functional transformer forward from a TransformerLens model's standard weights.

Supports LayerNorm and RMSNorm, learned and rotary (full or partial, half-split) positions,
grouped-query attention, GELU/SiLU/ReLU and gated MLPs, sequential and parallel attention+MLP
blocks. It can start at any block from a cached residual, attend over a cached K/V prefix, and
stop before the unembedding. Anything it does not implement is either refused up front
(``UnsupportedModel``) or caught by the parity check (``ParityError``) against the model's own
forward and hook values on the caller's tokens: it never returns a wrong number silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Int
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
_UNSUPPORTED_FLAGS = {
    "use_qk_norm": False,
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

    ln1_w: Tensor
    ln1_b: Optional[Tensor]
    ln2_w: Tensor
    ln2_b: Optional[Tensor]
    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor  # [n_kv_heads, d_model, d_head]
    W_V: Tensor
    W_O: Tensor  # [n_heads, d_head, d_model]
    b_Q: Optional[Tensor]
    b_K: Optional[Tensor]
    b_V: Optional[Tensor]
    b_O: Optional[Tensor]
    W_in: Tensor  # [d_model, d_mlp]
    W_gate: Optional[Tensor]
    W_out: Tensor  # [d_mlp, d_model]
    b_in: Optional[Tensor]
    b_out: Optional[Tensor]
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
class Trace:
    """Every activation of a full forward, per layer, in the hook layouts (batch first)."""

    resid_pre: List[Tensor] = field(default_factory=list)  # [batch, pos, d_model]
    q: List[Tensor] = field(default_factory=list)  # [batch, pos, n_heads, d_head], before rotary
    k: List[Tensor] = field(default_factory=list)  # [batch, pos, n_kv_heads, d_head], before rotary
    v: List[Tensor] = field(default_factory=list)
    k_rot: List[Tensor] = field(default_factory=list)  # keys as attention sees them
    pattern: List[Tensor] = field(default_factory=list)  # [batch, n_heads, dest, src]
    z: List[Tensor] = field(default_factory=list)  # [batch, pos, n_heads, d_head]
    attn_out: List[Tensor] = field(default_factory=list)
    resid_mid: List[Tensor] = field(default_factory=list)  # sequential blocks only
    mlp_out: List[Tensor] = field(default_factory=list)
    resid_final: Optional[Tensor] = None  # resid_post of the last block
    logits: Optional[Tensor] = None
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
            out[f"blocks.{l}.hook_mlp_out"] = self.mlp_out[l]
        if self.logits is not None:
            out["logits"] = self.logits
        return out


def _weight(module: Any, name: str) -> Optional[Tensor]:
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, Tensor) else None


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
        for flag in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            if float(getattr(cfg, flag, -1.0) or -1.0) > 0:
                raise UnsupportedModel(f"the native backend does not implement cfg.{flag}")
        if getattr(cfg, "attention_dir", "causal") != "causal":
            raise UnsupportedModel("the native backend needs causal attention")
        self.norm = cfg.normalization_type
        if self.norm not in ("LN", "RMS"):
            raise UnsupportedModel(f"the native backend does not implement normalization_type={self.norm!r}")
        self.positions = cfg.positional_embedding_type
        if self.positions not in ("standard", "rotary"):
            raise UnsupportedModel(f"the native backend does not implement {self.positions!r} positions")
        if cfg.act_fn not in _ACTIVATIONS:
            raise UnsupportedModel(f"the native backend does not implement act_fn={cfg.act_fn!r}")
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.eps = float(cfg.eps)
        self.parallel = bool(cfg.parallel_attn_mlp)
        self.gated = bool(cfg.gated_mlp)
        self.n_layers, self.n_heads, self.d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        attn_scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        self.attn_scale = attn_scale if attn_scale > 0 else math.sqrt(self.d_head)
        if not getattr(cfg, "use_attn_scale", True):
            self.attn_scale = 1.0
        try:
            self.layers = [self._layer(block) for block in model.blocks]
            self.W_E = model.W_E.detach()
            self.W_pos = model.W_pos.detach() if self.positions == "standard" else None
            self.W_U = model.W_U.detach()
            self.b_U = _weight(model, "b_U")
            self.lnf_w = _weight(model.ln_final, "w")
            self.lnf_b = _weight(model.ln_final, "b") if self.norm == "LN" else None
        except (AttributeError, TypeError) as error:
            raise UnsupportedModel(f"the model does not expose TransformerLens-standard weights: {error}") from None
        if self.lnf_w is None:
            raise UnsupportedModel("the model's final norm has no weight")
        self.rotary: Optional[List[tuple]] = None  # per layer (cos, sin): [pos, rotary_dim]
        self._future_masks: Dict[tuple, Tensor] = {}  # (n_keys, device) -> [n_keys, n_keys] causal mask

    def _layer(self, block: Any) -> Layer:
        attn, mlp = block.attn, block.mlp
        lnb = (lambda ln: _weight(ln, "b")) if self.norm == "LN" else (lambda ln: None)
        return Layer(
            ln1_w=_weight(block.ln1, "w"), ln1_b=lnb(block.ln1), ln2_w=_weight(block.ln2, "w"), ln2_b=lnb(block.ln2),
            W_Q=attn.W_Q.detach(), W_K=attn.W_K.detach(), W_V=attn.W_V.detach(), W_O=attn.W_O.detach(),
            b_Q=_weight(attn, "b_Q"), b_K=_weight(attn, "b_K"), b_V=_weight(attn, "b_V"), b_O=_weight(attn, "b_O"),
            W_in=mlp.W_in.detach(), W_gate=_weight(mlp, "W_gate") if self.gated else None, W_out=mlp.W_out.detach(),
            b_in=_weight(mlp, "b_in"), b_out=_weight(mlp, "b_out"),
        )

    # ---- pieces -------------------------------------------------------------------------------
    def normalize(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return normalize(x, w, b, self.norm, self.eps)

    def rotate(self, layer: int, x: Tensor, start: int) -> Tensor:
        """Rotary embedding of ``[rows, pos, heads, d_head]`` for positions ``start, start+1, ...``."""
        if self.rotary is None:
            return x
        cos, sin = self.rotary[layer]
        n = x.shape[1]
        cos, sin = cos[start : start + n, None, :], sin[start : start + n, None, :]
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)

    def qkv(self, layer: int, x_norm: Tensor):
        """q ``[..., n_heads, d_head]``, k and v ``[..., n_kv_heads, d_head]`` (before rotary)."""
        L = self.layers[layer]
        fused = x_norm @ L.W_QKV
        if L.b_QKV is not None:
            fused = fused + L.b_QKV
        nq, nkv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        q, k, v = fused.split([nq, nkv, nkv], dim=-1)
        lead = x_norm.shape[:-1]
        return (
            q.reshape(*lead, self.n_heads, self.d_head),
            k.reshape(*lead, self.n_kv_heads, self.d_head),
            v.reshape(*lead, self.n_kv_heads, self.d_head),
        )

    def attend(self, q_rot: Tensor, k_rot: Tensor, v: Tensor, q_start: int) -> tuple:
        """Causal attention of queries at ``q_start..`` over keys at ``0..``; GQA by head groups.

        q_rot ``[rows, nq, heads, d_head]``; k_rot, v ``[rows, nk, kv_heads, d_head]``.
        Returns pattern ``[rows, heads, nq, nk]`` and z ``[rows, nq, heads, d_head]``.
        """
        group = q_rot.shape[2] // k_rot.shape[2]
        if group > 1:
            k_rot = k_rot.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("rqhe,rkhe->rhqk", q_rot, k_rot) / self.attn_scale
        future = self.future_mask(q_rot.shape[1], k_rot.shape[1], q_start, q_rot.device)
        pattern = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        z = torch.einsum("rhqk,rkhe->rqhe", pattern, v)
        return pattern, z

    def future_mask(self, nq: int, nk: int, q_start: int, device: torch.device) -> Tensor:
        """``[nq, nk]``, True where key position ``k`` is after query position ``q_start + i``.

        Built once per (number of keys, device) for this model (one forward's calls share it) and
        sliced by rows (a view): the query positions of a causal pass are at most the keys'.
        """
        if q_start + nq > nk:  # queries past the last key (not a causal pass here): built directly
            return torch.arange(nk, device=device)[None, :] > torch.arange(q_start, q_start + nq, device=device)[:, None]
        key = (nk, torch.device(device))
        mask = self._future_masks.get(key)
        if mask is None:
            positions = torch.arange(nk, device=device)
            mask = self._future_masks[key] = positions[None, :] > positions[:, None]
        return mask[q_start : q_start + nq]

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        """``[..., n_heads, d_head] -> [..., d_model]``: heads' outputs through W_O, summed."""
        L = self.layers[layer]
        out = z.reshape(*z.shape[:-2], -1) @ L.W_O_flat
        return out if L.b_O is None else out + L.b_O

    def linearised_norm_delta(self, x: Tensor, delta: Tensor, w: Tensor) -> Tensor:
        """First-order change of ``normalize(x)`` with the scale frozen (see ``fastpatch.ops.norms``)."""
        return linearised_norm_delta(x, delta, w, self.norm, self.eps)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        L = self.layers[layer]
        return self.mlp_from_normalized(layer, self.normalize(x, L.ln2_w, L.ln2_b))

    def mlp_from_normalized(self, layer: int, h: Tensor) -> Tensor:
        """The MLP of block ``layer`` on its already normalised input."""
        L = self.layers[layer]
        pre = h @ L.W_in
        if L.b_in is not None:
            pre = pre + L.b_in
        post = self.act(h @ L.W_gate) * pre if self.gated else self.act(pre)
        out = post @ L.W_out
        return out if L.b_out is None else out + L.b_out

    def final_norm(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.lnf_w, self.lnf_b)

    def unembed(self, x_norm: Tensor) -> Tensor:
        out = x_norm @ self.W_U
        return out if self.b_U is None else out + self.b_U

    # ---- whole runs ---------------------------------------------------------------------------
    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Trace:
        """The full forward of ``tokens`` with every activation kept."""
        t = Trace()
        x = self.W_E[tokens]
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        for l, L in enumerate(self.layers):
            t.resid_pre.append(x)
            q, k, v = self.qkv(l, self.normalize(x, L.ln1_w, L.ln1_b))
            k_rot = self.rotate(l, k, 0)
            pattern, z = self.attend(self.rotate(l, q, 0), k_rot, v, 0)
            attn_out = self.attn_out(l, z)
            for name, value in (("q", q), ("k", k), ("v", v), ("k_rot", k_rot), ("pattern", pattern), ("z", z), ("attn_out", attn_out)):
                getattr(t, name).append(value)
            if self.parallel:
                mlp_out = self.mlp(l, x)
                x = x + attn_out + mlp_out
            else:
                mid = x + attn_out
                t.resid_mid.append(mid)
                mlp_out = self.mlp(l, mid)
                x = mid + mlp_out
            t.mlp_out.append(mlp_out)
        t.logits = self.unembed(self.final_norm(x))
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
                checks[name] = (value, logits)
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
            if native.positions == "rotary":
                native.rotary = []
                for l in range(native.n_layers):
                    if f"blocks.{l}.attn.hook_cos" not in cache:
                        raise UnsupportedModel("rotary model without hook_cos/hook_sin: rotary angles unknown")
                    cos, sin = cache[f"blocks.{l}.attn.hook_cos"], cache[f"blocks.{l}.attn.hook_sin"]
                    native.rotary.append((cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0], sin.reshape(-1, sin.shape[-2], sin.shape[-1])[0]))
            trace = native.trace(tokens)
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
            t.k_rot.append(self.rotate(l, t.k[l], 0))
        t.resid_final = own(f"blocks.{self.n_layers - 1}.hook_resid_post")
        return t


class NativeEngine(NamedTuple):
    """What the native backend runs a plan on: the checked native model and the corrupted run's trace."""

    native: NativeModel
    trace: Trace
