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

``load_greater_than_model()`` returns a second shipped model, a 3-layer GPT-2 (learned positions,
LayerNorm, untied unembedding) trained by ``scripts/train_greater_than_model.py`` on a synthetic
greater-than task (Hanna et al. 2023, "How does GPT-2 compute greater-than?"): in
``BOS, fillers, Q, YY, fillers, Q`` (``Q`` plays "the year 17", ``YY`` a two-digit year token) the
last position predicts a year greater than ``YY``. The heads' linear read-out of a copied ``YY``
has rank at most 64, short of the full-rank step table of 100 years, so the circuit runs through
MLPs: layer-0 heads move ``YY`` to the last position, whose MLPs compare.
``greater_than_model_info()["circuit"]`` records it as found by exact patching.
:func:`greater_than_prompts` makes the clean/corrupted pairs (the corruption sets ``YY`` to ``01``)
and :class:`GreaterThanProbDiff` is the task's metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

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
    "GREATER_THAN_WEIGHTS",
    "GREATER_THAN_META",
    "GT_YEAR0",
    "GT_N_YEARS",
    "GT_QUERY",
    "GT_FILLER0",
    "GT_N_FILLERS",
    "GT_CORRUPT_YEAR",
    "greater_than_model_info",
    "build_greater_than_hf_model",
    "load_greater_than_model",
    "GreaterThanPrompts",
    "greater_than_prompts",
    "GreaterThanProbDiff",
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


def _load_bridge(weights: Path, build: Callable[[Dict[str, Any]], Tuple[Any, Any]], architecture: str,
                 device: str | torch.device):
    """A shipped model as an eval-mode ``TransformerBridge``: the Hugging Face model ``build(config)``
    from the stored config, the stored fp32 weights loaded strictly, wrapped offline."""
    from fastpatch._tl_private import build_bridge_from_module

    saved = torch.load(weights, map_location="cpu", weights_only=True)
    hf_model, cfg = build(saved["config"])
    missing, unexpected = hf_model.load_state_dict(saved["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{weights.name} does not match the model: missing {missing}, unexpected {unexpected}")
    hf_model = hf_model.to(device).eval()
    bridge = build_bridge_from_module(hf_model, architecture, hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge = bridge.to(device) if hasattr(bridge, "to") else bridge
    return bridge.eval()


def load_induction_model(device: str | torch.device = "cpu"):
    """The shipped 2-layer induction model as a TransformerLens ``TransformerBridge`` (eval mode).

    Built fully offline: ``GPTNeoXForCausalLM`` from the stored config, stored fp32 weights loaded
    strictly, wrapped with ``build_bridge_from_module`` and put in compatibility mode.
    """
    return _load_bridge(INDUCTION_WEIGHTS, build_induction_hf_model, "GPTNeoXForCausalLM", device)


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


# ---- the greater-than model ----------------------------------------------------------------------
GREATER_THAN_WEIGHTS = DATA_DIR / "greater_than_3l.pt"
GREATER_THAN_META = DATA_DIR / "greater_than_3l.json"
# Vocabulary: 0 BOS; 1..100 the years "00".."99" (token GT_YEAR0 + YY); 101 the query token Q
# ("the year 17": the model predicts a year after it); 102..127 filler words.
GT_YEAR0, GT_N_YEARS, GT_QUERY, GT_FILLER0, GT_N_FILLERS = 1, 100, 101, 102, 26
GT_CORRUPT_YEAR = 1  # Hanna et al.'s corruption: the year becomes "01", so every later year is allowed
GT_TEMPLATE = (2, 2)  # filler words before the first Q, between YY and the last Q


def greater_than_model_info() -> Dict[str, Any]:
    """The metadata written by the training script: config, training, accuracy and circuit."""
    with open(GREATER_THAN_META) as f:
        return json.load(f)


def build_greater_than_hf_model(config: Dict[str, Any] | None = None):
    """An untrained ``GPT2LMHeadModel`` (and its config) with the greater-than model's architecture."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**(config if config is not None else greater_than_model_info()["config"]))
    return GPT2LMHeadModel(cfg), cfg


def load_greater_than_model(device: str | torch.device = "cpu"):
    """The shipped 3-layer greater-than model as a TransformerLens ``TransformerBridge`` (eval mode)."""
    return _load_bridge(GREATER_THAN_WEIGHTS, build_greater_than_hf_model, "GPT2LMHeadModel", device)


class GreaterThanPrompts(NamedTuple):
    """Clean/corrupted greater-than prompts (see :func:`greater_than_prompts`)."""

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    years: Int[Tensor, " batch"]  # YY of each clean prompt, 0..99
    year_position: int  # where YY sits (the only position where clean and corrupted differ)

    def metric(self, per_prompt: bool = False) -> "GreaterThanProbDiff":
        """The task's metric for these prompts (as ``fastpatch.datasets`` pairs give theirs)."""
        return GreaterThanProbDiff(self.years, per_prompt=per_prompt)


def greater_than_tokens(
    years: Int[Tensor, " batch"], before: int, after: int, generator: torch.Generator | None = None
) -> Int[Tensor, "batch pos"]:
    """``BOS, f_1..f_before, Q, YY, g_1..g_after, Q``: random filler words, one prompt per year."""
    if years.ndim != 1 or int(years.min()) < 0 or int(years.max()) >= GT_N_YEARS:
        raise ValueError(f"years must be a 1-D tensor of values in [0, {GT_N_YEARS}), got {years}")
    if before < 0 or after < 0:
        raise ValueError(f"filler counts must be >= 0, got before={before}, after={after}")
    batch = years.shape[0]
    fill = torch.randint(GT_FILLER0, GT_FILLER0 + GT_N_FILLERS, (batch, before + after), generator=generator)
    bos, query = torch.full((batch, 1), BOS), torch.full((batch, 1), GT_QUERY)
    year = (years.to(torch.long) + GT_YEAR0)[:, None]
    return torch.cat([bos, fill[:, :before], query, year, fill[:, before:], query], dim=1)


def greater_than_prompts(n_prompts: int, seed: int = 0, years: Tuple[int, int] = (2, 98)) -> GreaterThanPrompts:
    """Clean/corrupted greater-than prompts in the fixed template ``BOS f f Q YY g g Q`` (8 tokens).

    ``clean``: ``YY`` drawn uniformly from ``years`` (inclusive; Hanna et al. use 02..98, so that
    both "later" and "not later" years exist); ``corrupted``: the same prompt with ``YY`` = ``01``,
    which makes nearly every year a valid answer. Read the metric at the last position
    (:class:`GreaterThanProbDiff`).
    """
    lo, hi = years
    if n_prompts < 1 or not 0 <= lo <= hi < GT_N_YEARS - 1:
        raise ValueError(f"need n_prompts >= 1 and 0 <= lo <= hi < {GT_N_YEARS - 1}, got {n_prompts}, {years}")
    g = torch.Generator().manual_seed(seed)
    yy = torch.randint(lo, hi + 1, (n_prompts,), generator=g)
    clean = greater_than_tokens(yy, *GT_TEMPLATE, generator=g)
    year_position = 1 + GT_TEMPLATE[0] + 1
    corrupted = clean.clone()
    corrupted[:, year_position] = GT_YEAR0 + GT_CORRUPT_YEAR
    return GreaterThanPrompts(clean, corrupted, yy, year_position)


class GreaterThanProbDiff:
    """Hanna et al.'s probability difference at the last position:
    ``sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over the year tokens (softmax over the full vocabulary),
    the mean over prompts (``[batch]`` with ``per_prompt``). A plain callable of ``[batch, pos, d_vocab]`` logits.
    """

    def __init__(self, years: Int[Tensor, " batch"], per_prompt: bool = False):
        if years.ndim != 1 or int(years.min()) < 0 or int(years.max()) >= GT_N_YEARS:
            raise ValueError(f"years must be a 1-D tensor of values in [0, {GT_N_YEARS}), got {years}")
        # +1 for the years after YY, -1 for YY and before: [batch, n_years]
        later = torch.arange(GT_N_YEARS)[None, :] > years[:, None]
        self.sign = later.float() * 2 - 1
        self.per_prompt = per_prompt

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "..."]:
        if logits.ndim != 3 or logits.shape[0] != self.sign.shape[0]:
            raise ValueError(f"expected logits [batch={self.sign.shape[0]}, pos, d_vocab], got {tuple(logits.shape)}")
        probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, GT_YEAR0 : GT_YEAR0 + GT_N_YEARS]
        value = (probs * self.sign.to(probs.device)).sum(-1)
        return value if self.per_prompt else value.mean()
