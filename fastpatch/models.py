"""Small trained models shipped with fastpatch (no hub downloads needed).

``load_induction_model()`` returns a TransformerLens bridge around a 2-layer Pythia-style
GPT-NeoX (``GPTNeoXForCausalLM``: d_model 64, 4 heads of d_head 16, full rotary positions,
sequential attention then MLP, vocabulary 64 with token 0 reserved as BOS) trained by
``scripts/train_induction_model.py`` on ``BOS, x_1..x_p, r_1..r_n, r_1..r_n, r_1`` (a random
prefix, then a repeated sequence of distinct random tokens), with the loss on the second repeat
only. It continues repeated sequences almost perfectly and implements the classic induction
circuit: layer-0 previous-token heads whose output the layer-1 induction heads read through their
keys. ``induction_model_info()["circuit"]`` names the heads and the measurements that found them
(attention scores and exact patching); the tests re-derive them from the weights.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import torch

from fastpatch.data import DATA_DIR

__all__ = [
    "INDUCTION_WEIGHTS",
    "INDUCTION_META",
    "BOS",
    "induction_model_config",
    "induction_model_info",
    "build_induction_hf_model",
    "load_induction_model",
    "induction_prompts",
    "repeated_sequences",
]

INDUCTION_WEIGHTS = DATA_DIR / "induction_2l.pt"
INDUCTION_META = DATA_DIR / "induction_2l.json"
BOS = 0


def induction_model_info() -> Dict[str, Any]:
    """The metadata written by the training script: config, training, accuracy and circuit."""
    with open(INDUCTION_META) as f:
        return json.load(f)


def induction_model_config() -> Dict[str, Any]:
    """``GPTNeoXConfig`` keyword arguments of the shipped induction model."""
    return dict(induction_model_info()["config"])


def build_induction_hf_model(config: Dict[str, Any] | None = None):
    """An untrained ``GPTNeoXForCausalLM`` (and its config) with the induction model's architecture."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**(config if config is not None else induction_model_config()))
    return GPTNeoXForCausalLM(cfg), cfg


def load_induction_model(device: str | torch.device = "cpu"):
    """The shipped 2-layer induction model as a TransformerLens ``TransformerBridge`` (eval mode).

    Built fully offline: ``GPTNeoXForCausalLM`` from the stored config, stored fp32 weights loaded
    strictly, wrapped with ``build_bridge_from_module`` and put in compatibility mode.
    """
    from fastpatch._tl_private import build_bridge_from_module

    saved = torch.load(INDUCTION_WEIGHTS, map_location="cpu", weights_only=True)
    hf_model, cfg = build_induction_hf_model(saved["config"])
    missing, unexpected = hf_model.load_state_dict(saved["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"induction model weights do not match: missing {missing}, unexpected {unexpected}")
    hf_model = hf_model.to(device).eval()
    bridge = build_bridge_from_module(hf_model, "GPTNeoXForCausalLM", hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge = bridge.to(device) if hasattr(bridge, "to") else bridge
    return bridge.eval()


def repeated_sequences(
    batch: int, half_len: int, vocab: int = 64, repeats: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[batch, 1 + repeats*half_len]`` tokens ``BOS, r_1..r_n, r_1..r_n, ...``.

    The n tokens of a sequence are distinct, drawn from ``[1, vocab)``, so every token of a repeat
    has exactly one earlier occurrence per earlier repeat (induction is unambiguous).
    """
    if half_len > vocab - 1:
        raise ValueError(f"half_len {half_len} exceeds the {vocab - 1} non-BOS tokens")
    seq = torch.rand(batch, vocab - 1, generator=generator).argsort(-1)[:, :half_len] + 1
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return torch.cat([bos] + [seq] * repeats, dim=1)


def induction_prompts(
    n_prompts: int, half_len: int = 16, seed: int = 0, vocab: int = 64
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean/corrupted induction prompts and answer/wrong tokens for patching.

    Returns ``(clean, corrupted, answer, wrong)``:

    - ``clean`` ``[n_prompts, 1 + 2*half_len]``: ``BOS, r_1..r_n, r_1..r_n`` (n distinct tokens).
    - ``corrupted``: the same, but with the FIRST half replaced by n different tokens
      ``c_1..c_n`` disjoint from ``r`` (``BOS, c_1..c_n, r_1..r_n``), so the second half has no
      earlier occurrence and induction cannot predict it.
    - ``answer`` ``[n_prompts]``: what induction predicts at the last position of ``clean``
      (token ``r_n``, earlier at position n, followed by position n+1): ``r_1``.
    - ``wrong`` ``[n_prompts]``: the corrupted prompt's corresponding first-half token ``c_1``.

    The last position is the standard place to read the metric, e.g. the logit difference
    ``logits[:, -1, answer] - logits[:, -1, wrong]``.
    """
    if not 1 <= half_len <= (vocab - 1) // 2:
        raise ValueError(f"half_len must be in [1, {(vocab - 1) // 2}] for vocab {vocab}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(n_prompts, vocab - 1, generator=g).argsort(-1) + 1
    seq, other = perm[:, :half_len], perm[:, half_len : 2 * half_len]
    bos = torch.full((n_prompts, 1), BOS, dtype=torch.long)
    clean = torch.cat([bos, seq, seq], dim=1)
    corrupted = torch.cat([bos, other, seq], dim=1)
    return clean, corrupted, seq[:, 0].clone(), other[:, 0].clone()
