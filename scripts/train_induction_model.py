#!/usr/bin/env python
"""Train the small induction model shipped as ``fastpatch/data/induction_2l.{pt,json}``.

A 2-layer Pythia-style GPT-NeoX (``GPTNeoXForCausalLM``: d_model 64, 4 heads, MLPs, full
rotary position embeddings, sequential attention then MLP, vocabulary 64 with token 0 as BOS, no
dropout) is trained with Adam and a fixed seed on sequences ``BOS, x_1..x_p, r_1..r_n, r_1..r_n, r_1``
(n in [12, 20] and a random-length prefix p in [0, 8]; all p + n tokens distinct, from [1, 64);
one n, p per batch). The loss is on the second repeat only, which includes r_n predicting r_1 —
the last position of the ``induction_prompts`` used for patching.

Why rotary: a GPT-2 with learned absolute positions trained this way reaches 99.96% accuracy
without a previous-token or induction head (it finds the earlier occurrence through absolute
positions). Rotary attention sees only relative offsets, and the classic two-head circuit (a
layer-0 previous-token head, K-composed into layer-1 induction heads) forms within 500 steps.

After training it measures, on fresh ``BOS + seq + seq`` prompts through the TransformerLens
bridge (exactly as the tests do), the second-half accuracy and the circuit:

- previous-token score of each layer-0 head: mean attention from position i to i-1 (i >= 1);
- induction score of each layer-1 head: mean attention from second-half position n+k to k+1;
- activation patching of each head's output (clean into corrupted ``induction_prompts``,
  logit difference answer - wrong at the last position),

and writes weights (fp32) and metadata. Runs in about 40 seconds on one idle CPU core (2000 steps)::

    python scripts/train_induction_model.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_loop import fit  # noqa: E402  (scripts/, on the path when run as a script)

from fastpatch.models import (  # noqa: E402
    INDUCTION_META,
    INDUCTION_WEIGHTS,
    build_induction_hf_model,
    induction_prompts,
    load_induction_model,
    repeated_sequences,
)

CONFIG = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64, vocab_size=64,
    intermediate_size=256, hidden_act="gelu", rotary_pct=1.0, use_parallel_residual=False,
    hidden_dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5, initializer_range=0.02,
    bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
)
MIN_N, MAX_N, MAX_PREFIX = 12, 20, 8


def training_batch(batch: int, n: int, prefix: int, g: torch.Generator) -> torch.Tensor:
    """``BOS, x_1..x_p, r_1..r_n, r_1..r_n, r_1``: all p + n tokens distinct, from [1, vocab)."""
    perm = torch.rand(batch, CONFIG["vocab_size"] - 1, generator=g).argsort(-1) + 1
    seq, pre = perm[:, :n], perm[:, n : n + prefix]
    bos = torch.zeros(batch, 1, dtype=torch.long)
    return torch.cat([bos, pre, seq, seq, seq[:, :1]], dim=1)


def induction_loss(model, tokens: torch.Tensor, n: int, prefix: int) -> torch.Tensor:
    start = 1 + prefix + n  # first position of the second repeat (token r_1)
    logits = model(tokens).logits[:, start:-1]  # predicts r_2..r_n, then r_1 after r_n
    targets = tokens[:, start + 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def second_half_accuracy(model, n_prompts: int = 512, seed: int = 12345) -> dict:
    """Accuracy on ``BOS + seq + seq``: second half (positions n+1..2n-1 -> r_2..r_n) and last position (-> r_1)."""
    g = torch.Generator().manual_seed(seed)
    hits = total = last_hits = last_total = 0
    for n in range(MIN_N, MAX_N + 1):
        tokens = repeated_sequences(n_prompts // (MAX_N - MIN_N + 1) + 1, n, CONFIG["vocab_size"], 2, g)
        logits = model(tokens)
        logits = logits.logits if hasattr(logits, "logits") else logits
        pred = logits.argmax(-1)
        hits += (pred[:, n + 1 : 2 * n] == tokens[:, n + 2 :]).sum().item()
        total += tokens[:, n + 2 :].numel()
        last_hits += (pred[:, -1] == tokens[:, 1]).sum().item()
        last_total += tokens.shape[0]
    return {"second_half": hits / total, "last_position": last_hits / last_total}


def train(steps: int, batch: int, lr: float, seed: int, max_prefix: int = MAX_PREFIX) -> tuple:
    torch.manual_seed(seed)
    model, _ = build_induction_hf_model(CONFIG)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        n = int(torch.randint(MIN_N, MAX_N + 1, (1,), generator=g))
        prefix = int(torch.randint(0, max_prefix + 1, (1,), generator=g))
        return induction_loss(model, training_batch(batch, n, prefix, g), n, prefix)

    def progress() -> str:
        acc = second_half_accuracy(model, n_prompts=128)
        return f"second-half acc {acc['second_half']:.3f}  last-pos acc {acc['last_position']:.3f}"

    seconds = fit(model, torch.optim.Adam(model.parameters(), lr=lr), steps, seed, batch_loss, progress, every=250)
    return model, seconds


@torch.no_grad()
def analyse(n_prompts: int = 64, half_len: int = 16, seed: int = 7) -> dict:
    """Head roles from the saved model's attention patterns and head-output patching (via the bridge)."""
    from fastpatch.patching import get_act_patch_attn_head_out_all_pos

    model = load_induction_model()
    n = half_len
    clean, corrupted, answer, wrong = induction_prompts(n_prompts, half_len, seed)
    _, cache = model.run_with_cache(clean)
    p0 = cache["blocks.0.attn.hook_pattern"]  # [batch, head, query, key]
    p1 = cache["blocks.1.attn.hook_pattern"]
    q = torch.arange(1, clean.shape[1])
    prev = p0[:, :, q, q - 1].mean((0, 2))
    q2 = torch.arange(n + 1, 2 * n + 1)  # second-half positions n+k, k = 1..n
    ind = p1[:, :, q2, q2 - n + 1].mean((0, 2))

    def logit_diff(logits):
        last = logits[:, -1]
        return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

    clean_ld = logit_diff(model(clean)).item()
    corrupted_ld = logit_diff(model(corrupted)).item()
    effect = get_act_patch_attn_head_out_all_pos(model, corrupted, cache, logit_diff, progress=False)
    return {
        "previous_token_scores": [round(v, 4) for v in prev.tolist()],
        "induction_scores": [round(v, 4) for v in ind.tolist()],
        "patch_head_out_logit_diff": [[round(v, 4) for v in row] for row in effect.tolist()],
        "clean_logit_diff": round(clean_ld, 4),
        "corrupted_logit_diff": round(corrupted_ld, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prefix", type=int, default=MAX_PREFIX)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, seconds = train(args.steps, args.batch, args.lr, args.seed, args.max_prefix)
    acc = second_half_accuracy(model)
    print(f"final: second-half accuracy {acc['second_half']:.4f}, last-position accuracy {acc['last_position']:.4f}")

    INDUCTION_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().float().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": CONFIG}, INDUCTION_WEIGHTS)

    meta = {
        "architecture": "GPTNeoXForCausalLM",
        "config": CONFIG,
        "training": {
            "seed": args.seed, "max_prefix": args.max_prefix, "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
            "optimizer": "Adam, 100-step linear warm-up then linear decay to 5%",
            "data": f"BOS, x_1..x_p, r_1..r_n, r_1..r_n, r_1 with p + n distinct random tokens from "
                    f"[1, {CONFIG['vocab_size']}), n in [{MIN_N}, {MAX_N}], p in [0, {MAX_PREFIX}] "
                    "(one n, p per batch; the random prefix defeats positional shortcuts); BOS = 0",
            "loss": "cross-entropy on the second repeat only (targets r_2..r_n, then r_1 after r_n)",
            "threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "accuracy_definition": "argmax next-token accuracy on BOS + seq + seq: second_half = positions "
                               "n+1..2n-1 (targets r_2..r_n), last_position = position 2n (target r_1)",
    }
    with open(INDUCTION_META, "w") as f:  # analyse() loads the config from here
        json.dump(meta, f, indent=2)

    scores = analyse()
    prev, ind = scores["previous_token_scores"], scores["induction_scores"]
    effect1 = scores["patch_head_out_logit_diff"][1]
    # Only heads that pass the attention tests are named: an empty list means "not found".
    previous = [h for h in range(len(prev)) if prev[h] > 0.5]
    top_effect = max(range(len(effect1)), key=effect1.__getitem__)
    induction = sorted((h for h in range(len(ind)) if ind[h] > 0.5), key=lambda h: -effect1[h])
    # Keep only the heads whose patching effect is above every non-induction layer-1 head's.
    others = max([effect1[h] for h in range(len(ind)) if h not in induction], default=float("-inf"))
    induction = [h for h in induction if effect1[h] > others]
    meta["circuit"] = {
        "previous_token_heads": [[0, h] for h in previous],
        "induction_heads": [[1, h] for h in induction],
        "definition": {
            "previous_token_scores": "layer-0 heads: mean attention from position i to i-1 (i >= 1)",
            "induction_scores": "layer-1 heads: mean attention from position n+k to k+1 (k = 1..n)",
            "patch_head_out_logit_diff": "get_act_patch_attn_head_out_all_pos, clean cache into corrupted, "
                                         "metric mean logit(answer) - logit(wrong) at the last position",
            "prompts": "induction_prompts(64, half_len=16, seed=7)",
        },
        **scores,
    }
    with open(INDUCTION_META, "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta["circuit"], indent=1))
    ok = bool(previous) and bool(induction) and top_effect in induction and acc["second_half"] > 0.9
    if not ok:
        print("ERROR: no clean induction circuit (or accuracy <= 0.9): do not ship these weights")
    print(f"trained in {seconds:.1f}s; wrote {INDUCTION_WEIGHTS} ({INDUCTION_WEIGHTS.stat().st_size} bytes), "
          f"{INDUCTION_META} ({INDUCTION_META.stat().st_size} bytes)")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
