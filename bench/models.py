"""Benchmark models and inputs, built offline: a random-init GPT-2 and IOI-shaped prompt pairs.

The model is a TransformerLens bridge around a freshly initialised Hugging Face
``GPT2LMHeadModel`` (no hub download), built the same way as ``tests/zoo.py``. Its shape defaults
to GPT-2 small; ``initializer_range=0.05`` (GPT-2 uses 0.02) so that patch effects are clearly
nonzero and a value comparison means something.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from jaxtyping import Float, Int

BOS = 0


def _bridge(module: torch.nn.Module, architecture: str, cfg) -> torch.nn.Module:
    from fastpatch._tl_private import build_bridge_from_module

    bridge = build_bridge_from_module(module.eval(), architecture, hf_config=cfg)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def gpt2_small_shaped(
    seed: int = 0,
    n_layers: int = 12,
    d_model: int = 768,
    n_heads: int = 12,
    vocab: int = 50257,
    n_ctx: int = 1024,
) -> torch.nn.Module:
    """A random-init GPT-2 (GPT-2 small's shape by default) as an eval-mode TransformerLens bridge."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=n_ctx,
        initializer_range=0.05, bos_token_id=BOS, eos_token_id=BOS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return _bridge(GPT2LMHeadModel(cfg), "GPT2LMHeadModel", cfg)


def gemma2_shaped(
    seed: int = 0, n_layers: int = 12, d_model: int = 768, n_heads: int = 12, vocab: int = 50257, n_ctx: int = 1024
) -> torch.nn.Module:
    """A random-init Gemma 2 in GPT-2 small's size class: ``n_heads`` query heads of 64, half as
    many K/V heads, a gated GELU MLP of 4 ``d_model``, pre- and post-norms, soft caps, and
    alternating sliding-window (window 8, so it bites at 15 positions) and global layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
        head_dim=d_model // n_heads, intermediate_size=4 * d_model, vocab_size=vocab, max_position_embeddings=n_ctx,
        sliding_window=8, query_pre_attn_scalar=d_model // n_heads, initializer_range=0.05,
        bos_token_id=BOS, eos_token_id=BOS, pad_token_id=BOS,
    )
    return _bridge(Gemma2ForCausalLM(cfg), "Gemma2ForCausalLM", cfg)


def mixtral_shaped(
    seed: int = 0, n_layers: int = 12, d_model: int = 768, n_heads: int = 12, vocab: int = 50257, n_ctx: int = 1024
) -> torch.nn.Module:
    """A random-init Mixtral in GPT-2 small's size class: ``n_heads`` query heads, a third as many
    K/V heads, 8 experts of 3.5 ``d_model`` (Mixtral's ratio) with 2 chosen per token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_heads // 3,
        intermediate_size=7 * d_model // 2, num_local_experts=8, num_experts_per_tok=2, vocab_size=vocab,
        max_position_embeddings=n_ctx, initializer_range=0.05, bos_token_id=BOS, eos_token_id=BOS,
    )
    return _bridge(MixtralForCausalLM(cfg), "MixtralForCausalLM", cfg)


# --arch of the benchmark scripts: (builder, description)
ARCHITECTURES = {
    "gpt2": (gpt2_small_shaped, "GPT2LMHeadModel (random init, initializer_range 0.05)"),
    "gemma2": (gemma2_shaped, "Gemma2ForCausalLM (random init, initializer_range 0.05, sliding window 8)"),
    "mixtral": (mixtral_shaped, "MixtralForCausalLM (random init, initializer_range 0.05, 8 experts, top 2)"),
}


def shaped_model(args: Any, device: torch.device, seed: Optional[int] = None,
                 build: Callable[..., torch.nn.Module] = gpt2_small_shaped) -> torch.nn.Module:
    """``build`` at a benchmark script's ``--layers/--d-model/--heads/--vocab`` shape, seeded with
    ``seed`` (default ``args.seed``), moved to ``device``."""
    model = build(args.seed if seed is None else seed, args.layers, args.d_model, args.heads, args.vocab)
    return model if device.type == "cpu" else model.to(device, print_details=False)


def shaped_prompts(args: Any, device: torch.device, seed: Optional[int] = None,
                   corrupt_from: Optional[int] = None) -> PromptPair:
    """:func:`ioi_like_tokens` at a benchmark script's ``--vocab/--batch/--positions/--corrupt-from``
    (``corrupt_from`` overrides the last), seeded with ``seed`` (default ``args.seed``), on ``device``."""
    pair = ioi_like_tokens(args.vocab, args.batch, args.positions,
                           args.corrupt_from if corrupt_from is None else corrupt_from,
                           args.seed if seed is None else seed)
    return PromptPair(*(t.to(device) for t in pair))


class PromptPair(NamedTuple):
    """Clean and corrupted prompts plus the answer / wrong token of each clean prompt."""

    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]


def ioi_like_tokens(
    model_vocab: int, batch: int = 8, n_pos: int = 15, corrupt_from: int = 10, seed: int = 0
) -> PromptPair:
    """IOI-shaped prompt pairs: identical before ``corrupt_from``, different at every position after.

    Each clean prompt is ``BOS, A, filler, B, filler..., B (at corrupt_from), filler...``: two
    "names" A (indirect object, the answer) and B (subject, the wrong answer), with B repeated at
    ``corrupt_from``. The corrupted prompt swaps that repeat to a third name C and redraws every
    later token, so positions ``>= corrupt_from`` all differ from the clean prompt. All ids are in
    ``[1, model_vocab)``; int64 on CPU.
    """
    if not 3 < corrupt_from < n_pos:
        raise ValueError(f"need 3 < corrupt_from < n_pos, got corrupt_from={corrupt_from}, n_pos={n_pos}")
    if model_vocab < 8:
        raise ValueError(f"model_vocab must be at least 8, got {model_vocab}")
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, model_vocab, (batch, n_pos), generator=g)
    clean[:, 0] = BOS
    # Three distinct names per prompt.
    names = torch.stack([torch.randperm(model_vocab - 1, generator=g)[:3] + 1 for _ in range(batch)])
    a, b, c = names.unbind(dim=1)
    clean[:, 1], clean[:, 3], clean[:, corrupt_from] = a, b, b
    corrupted = clean.clone()
    corrupted[:, corrupt_from] = c
    tail = slice(corrupt_from + 1, n_pos)
    # Redraw the tail, shifting by a nonzero offset so every position really changes.
    shift = torch.randint(1, model_vocab - 1, clean[:, tail].shape, generator=g)
    corrupted[:, tail] = (clean[:, tail] - 1 + shift) % (model_vocab - 1) + 1
    return PromptPair(clean, corrupted, a.clone(), b.clone())


def logit_diff_metric(
    answer: Int[torch.Tensor, " batch"], wrong: Int[torch.Tensor, " batch"]
) -> Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Float[torch.Tensor, ""]]:
    """A scalar patching metric: mean over prompts of last-position ``logit[answer] - logit[wrong]``."""

    def metric(logits: Float[torch.Tensor, "batch pos d_vocab"]) -> Float[torch.Tensor, ""]:
        last = logits[:, -1, :]
        rows = torch.arange(last.shape[0], device=last.device)
        diff = last[rows, answer.to(last.device)] - last[rows, wrong.to(last.device)]
        return diff.mean()

    return metric
