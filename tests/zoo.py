"""Random-init TransformerLens bridges of every architecture family fastpatch supports, built offline.

Small enough for a fast suite on 2 CPU cores; ``initializer_range`` 0.15 (and an odd head
count and vocabulary) so that patch effects differ clearly across cells and positions.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Callable, Dict

import torch

VOCAB = 89
N_CTX = 32


_BUILT: Dict[tuple, tuple] = {}


def _built_once(build: Callable) -> Callable:
    """Build each (builder, arguments) once per process and hand out deep copies of that pristine model.

    A copy is a fresh model (a test may move, cast or train it) with the very same weights, and the
    global RNG is left exactly as the builder leaves it, so a cache hit is indistinguishable from a
    rebuild. Copies are taken before any forward pass: a used bridge holds non-leaf tensors that
    ``copy.deepcopy`` refuses.
    """
    signature = inspect.signature(build)

    @functools.wraps(build)
    def cached(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = (build.__name__, tuple(bound.arguments.items()))
        if key not in _BUILT:
            model = build(*args, **kwargs)
            _BUILT[key] = (model, torch.get_rng_state())
        model, rng_state = _BUILT[key]
        torch.set_rng_state(rng_state)
        return copy.deepcopy(model)

    return cached


def _bridge(module: torch.nn.Module, architecture: str, hf_config) -> "torch.nn.Module":
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    bridge = build_bridge_from_module(module.eval(), architecture, hf_config=hf_config)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


@_built_once
def gpt2(seed: int = 0, n_layers: int = 3, d_model: int = 48, n_heads: int = 3, vocab: int = VOCAB):
    """GPT-2 style: LayerNorm, learned positions, GELU MLP, sequential blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=N_CTX,
        initializer_range=0.15, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return _bridge(GPT2LMHeadModel(cfg), "GPT2LMHeadModel", cfg)


@_built_once
def neox(seed: int = 0):
    """GPT-NeoX / Pythia style: partial rotary, parallel attention and MLP, LayerNorm."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        num_hidden_layers=3, hidden_size=48, num_attention_heads=3, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=N_CTX, initializer_range=0.15,
        use_parallel_residual=True, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
    )
    return _bridge(GPTNeoXForCausalLM(cfg), "GPTNeoXForCausalLM", cfg)


@_built_once
def llama(seed: int = 0):
    """LLaMA / Mistral style: RMSNorm, rotary, grouped-query attention (4 query, 2 K/V heads), gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=80, vocab_size=VOCAB, max_position_embeddings=N_CTX, initializer_range=0.15,
    )
    return _bridge(LlamaForCausalLM(cfg), "LlamaForCausalLM", cfg)


@_built_once
def native(seed: int = 0):
    """TransformerLens's own ``boot_native`` model (LayerNorm, learned positions)."""
    from transformer_lens.model_bridge.sources import boot_native

    torch.manual_seed(seed)
    model = boot_native(
        {"n_layers": 3, "d_model": 48, "n_heads": 3, "d_head": 16, "d_vocab": VOCAB, "n_ctx": N_CTX,
         "d_mlp": 96, "act_fn": "gelu", "seed": seed, "initializer_range": 0.15}
    )
    return model.eval()


ZOO: Dict[str, Callable] = {"gpt2": gpt2, "neox": neox, "llama": llama, "native": native}


def prompt_pair(batch: int = 3, n_pos: int = 5, first_diff: int = 2, seed: int = 1):
    """Clean and corrupted tokens that agree before ``first_diff`` (like IOI prompts) and differ after."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (batch, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, first_diff:] = torch.randint(0, VOCAB, (batch, n_pos - first_diff), generator=g)
    return clean, corrupted


def _answer_logprob(answer: torch.Tensor):
    """Per-prompt log-probability of the clean answer at the last position: ``[batch]``."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)

    return metric


def _logit_gap(answer: torch.Tensor, wrong: torch.Tensor):
    """Per-prompt logit difference answer - wrong at the last position: ``[batch]``."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return last.gather(-1, answer[:, None]).squeeze(-1) - last.gather(-1, wrong[:, None]).squeeze(-1)

    return metric


class Case:
    """A model, a clean/corrupted prompt pair, the clean cache and a few metrics."""

    def __init__(self, name: str, model, clean: torch.Tensor, corrupted: torch.Tensor):
        self.name, self.model, self.clean, self.corrupted = name, model, clean, corrupted
        with torch.no_grad():
            _, self.clean_cache = model.run_with_cache(clean)
        answer, wrong = clean[:, -1], corrupted[:, -1]
        self.per_example = _answer_logprob(answer)
        self.scalar = lambda logits: self.per_example(logits).mean()
        self.metrics = {"logprob": self.per_example, "logit_gap": _logit_gap(answer, wrong)}

    @classmethod
    def build(cls, name: str, batch: int = 3, n_pos: int = 5, first_diff: int = 2) -> "Case":
        clean, corrupted = prompt_pair(batch, n_pos, first_diff)
        return cls(name, ZOO[name](), clean, corrupted)


# six reference prompts for a mean ablation: more than the three patched ones (broadcast over the batch)
MEAN_REFERENCE = torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(7))


def ablation_source(case: Case, kind: str):
    """The tests' ``kind`` source for ``case``: ``zero`` (the clean prompts' shapes), ``mean`` (of
    ``MEAN_REFERENCE``, broadcast to the batch) or ``resample`` (the clean prompts permuted, seed 1)."""
    from fastpatch.sources import mean_ablation, resample_ablation, zero_ablation

    model = case.model
    if kind == "zero":
        return zero_ablation(model, case.clean)
    if kind == "mean":
        return mean_ablation(model, MEAN_REFERENCE, batch=case.corrupted.shape[0])
    if kind == "resample":
        return resample_ablation(model, case.clean, seed=1)
    raise ValueError(f"unknown ablation source kind {kind!r}")


# ---- architecture zoo (tests/test_architectures.py) -------------------------------------------------
# One tiny random-init bridge per architecture family: 2 layers, d_model 48, 4 query heads (2 K/V
# heads where the family has grouped-query attention), every norm's weight (and bias) perturbed so
# conventions such as Gemma's (1 + w) show. Kept out of ZOO so the main oracle tests do not grow.
_SMALL = dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=80,
              max_position_embeddings=N_CTX, vocab_size=VOCAB, initializer_range=0.15)
_GQA = dict(_SMALL, num_key_value_heads=2)
_GEMMA = dict(_GQA, head_dim=12, query_pre_attn_scalar=10)
_SLIDING = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"])  # the window bites at 5 positions
ARCH_CONFIGS: Dict[str, tuple] = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=12)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_GEMMA, **_SLIDING, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GEMMA, **_SLIDING, rope_local_base_freq=100.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA, use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=3)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_SMALL, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_GQA)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_GQA)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_GQA)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    # the bridge's cfg.use_qk_norm=True (RMS QK-norm); dense blocks only (GLM's routed experts are not Mixtral's)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(_GQA, use_qk_norm=True, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=2)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_layer=2, n_embd=48, n_head=4, rotary_dim=6, n_positions=N_CTX, vocab_size=VOCAB,
                  initializer_range=0.15, bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, ffn_dim=80, max_position_embeddings=N_CTX,
                 word_embed_proj_dim=48, vocab_size=VOCAB, init_std=0.15, pad_token_id=1)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, new_decoder_architecture=False,
                    parallel_attn=True, alibi=False, multi_query=True, vocab_size=VOCAB, initializer_range=0.15)),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(n_layer=2, hidden_size=48, n_head=4, vocab_size=VOCAB, initializer_range=0.15)),
    # hooks only: DeepSeek-V2's multi-head latent attention (no W_Q), Gemma 4 and Jamba, whose block 0 is a Mamba mixer
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(_GQA, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                         n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2,
                         first_k_dense_replace=2)),
    # Gemma 4's per-layer head sizes (the global layer's heads are twice as wide): the bridge's W_Q refuses them
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               dict(_GQA, head_dim=12, **_SLIDING, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                    per_layer_config={"01": {"head_dim": 24}})),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(_GQA, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, expert_layer_offset=99,
                   num_experts=1, mamba_d_state=4, mamba_expand=2)),
}


def _perturb_norms(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every norm's weight (and bias) away from its init, so a wrong weight convention fails."""
    with torch.no_grad():
        for sub in module.modules():
            if "Norm" in type(sub).__name__:
                for p in sub.parameters(recurse=False):
                    p.add_(torch.randn_like(p) * scale)


@_built_once
def arch(name: str, seed: int = 0):
    """The ``ARCH_CONFIGS[name]`` model as a TransformerLens bridge (random init, norms perturbed)."""
    import transformers

    config_cls, model_cls, kwargs = ARCH_CONFIGS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**kwargs)
    module = getattr(transformers, model_cls)(cfg)
    _perturb_norms(module)
    return _bridge(module, model_cls, cfg)


ARCH_ZOO: Dict[str, Callable] = {name: functools.partial(arch, name) for name in ARCH_CONFIGS}


def arch_case(name: str) -> Case:
    """The ``ARCH_ZOO[name]`` model with two prompt pairs of 5 tokens that differ from position 1."""
    clean, corrupted = prompt_pair(batch=2, n_pos=5, first_diff=1)
    return Case(name, ARCH_ZOO[name](), clean, corrupted)
