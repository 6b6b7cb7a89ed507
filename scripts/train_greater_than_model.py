#!/usr/bin/env python
"""Train the small greater-than model shipped as ``fastpatch/data/greater_than_3l.{pt,json}``.

A 3-layer GPT-2 (``GPT2LMHeadModel``: d_model 64, 4 heads of d_head 16, MLPs of 256, learned
positions, LayerNorm, untied unembedding, no dropout) is trained with Adam and a fixed seed on a
synthetic version of the greater-than task (Hanna et al. 2023): sequences
``BOS, f_1..f_a, Q, YY, g_1..g_b, Q`` (``a, b`` in [0, 4], one pair per batch; ``f, g`` random filler
words, ``Q`` the query token that plays "the year 17", ``YY`` a year token 00..98). The loss is the
cross-entropy at the last position against the uniform distribution over the years after ``YY``.

Why it needs MLPs: the last position must put its mass on the years above ``YY`` and none on the
others, a step in ``y - YY`` for each of 100 years. Attention can copy ``YY`` to the last
position, but the heads' linear read-out of the copy (year -> year logits) has rank at most
4 x 16 = 64, short of the full-rank triangular 100 x 100 table, so the comparison needs the MLPs.
Trained this way (seed 0, 1500 steps, about 2.5 minutes on the shared 2-core machine), the four
layer-0 heads move ``YY`` to the last position and that position's MLPs do the comparison
(``fastpatch/data/greater_than_3l.json``, ``circuit``).

After training it measures, through the TransformerLens bridge on ``greater_than_prompts(64,
seed=7)`` (clean ``YY`` in 02..98; corrupted ``YY`` = 01; metric: the probability difference
``p(y > YY) - p(y <= YY)`` over the years at the last position, :class:`GreaterThanProbDiff`):

- accuracy (the argmax over the vocabulary is a year after ``YY``) and the metric on clean and
  corrupted prompts;
- the circuit by exact patching (``fastpatch.patching``, clean into corrupted): head outputs
  (``get_act_patch_attn_head_out_all_pos``), MLP outputs by position (``get_act_patch_mlp_out``)
  and the residual stream by position (``get_act_patch_resid_pre``), each normalised by
  ``metric(clean) - metric(corrupted)``; the components whose normalised effect is at least
  ``CIRCUIT_THRESHOLD`` are the circuit,

and writes weights (fp32) and metadata. About a minute on one idle CPU core (1500 steps)::

    python scripts/train_greater_than_model.py
    python scripts/train_greater_than_model.py --analyse-only  # re-measure the circuit of the shipped weights
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_loop import fit  # noqa: E402  (scripts/, on the path when run as a script)

from fastpatch.models import (  # noqa: E402
    GREATER_THAN_META,
    GREATER_THAN_WEIGHTS,
    GT_N_YEARS,
    GT_YEAR0,
    GreaterThanProbDiff,
    build_greater_than_hf_model,
    greater_than_prompts,
    greater_than_tokens,
    load_greater_than_model,
)

CONFIG = dict(
    n_layer=3, n_embd=64, n_head=4, n_inner=256, vocab_size=128, n_positions=16, activation_function="gelu_new",
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02,
    bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
)
MAX_FILL = 4  # filler words before the first Q and between YY and the last Q: 0..MAX_FILL each
TRAIN_YEARS = (0, GT_N_YEARS - 2)  # 00..98: every year with at least one later year
CIRCUIT_THRESHOLD = 0.1  # normalised exact-patching effect of a circuit component
CIRCUIT_PROMPTS = dict(n_prompts=64, seed=7)


def training_batch(batch: int, g: torch.Generator) -> tuple:
    """Tokens ``[batch, 4 + a + b]`` of one random template and the years ``[batch]``."""
    before, after = (int(x) for x in torch.randint(0, MAX_FILL + 1, (2,), generator=g))
    years = torch.randint(TRAIN_YEARS[0], TRAIN_YEARS[1] + 1, (batch,), generator=g)
    return greater_than_tokens(years, before, after, generator=g), years


def later_years_target(years: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[batch, vocab]``: uniform over the year tokens after each ``YY``."""
    later = (torch.arange(GT_N_YEARS)[None, :] > years[:, None]).float()
    target = torch.zeros(years.shape[0], vocab)
    target[:, GT_YEAR0 : GT_YEAR0 + GT_N_YEARS] = later / later.sum(-1, keepdim=True)
    return target


def greater_than_loss(model, tokens: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits[:, -1]
    return -(later_years_target(years, logits.shape[-1]) * logits.log_softmax(-1)).sum(-1).mean()


@torch.no_grad()
def task_accuracy(model, n_prompts: int = 1024, seed: int = 12345) -> Dict[str, float]:
    """On fresh prompts of every template: fraction whose argmax is a year after ``YY``, and the mean metric."""
    g = torch.Generator().manual_seed(seed)
    hits = total = 0
    prob_diff = 0.0
    per = n_prompts // (MAX_FILL + 1) ** 2 + 1
    for before in range(MAX_FILL + 1):
        for after in range(MAX_FILL + 1):
            years = torch.randint(2, GT_N_YEARS - 1, (per,), generator=g)
            tokens = greater_than_tokens(years, before, after, generator=g)
            out = model(tokens)
            logits = out.logits if hasattr(out, "logits") else out
            pred = logits[:, -1].argmax(-1) - GT_YEAR0
            hits += ((pred > years) & (pred < GT_N_YEARS)).sum().item()
            total += per
            prob_diff += GreaterThanProbDiff(years)(logits).item() * per
    return {"accuracy": hits / total, "prob_diff": prob_diff / total}


def train(steps: int, batch: int, lr: float, seed: int) -> tuple:
    torch.manual_seed(seed)
    model, _ = build_greater_than_hf_model(CONFIG)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        return greater_than_loss(model, *training_batch(batch, g))

    def progress() -> str:
        acc = task_accuracy(model, n_prompts=256)
        return f"accuracy {acc['accuracy']:.3f}  prob diff {acc['prob_diff']:.3f}"

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, fit(model, optimizer, steps, seed, batch_loss, progress, every=500)


def _cells(grid: torch.Tensor, threshold: float) -> List[List[Any]]:
    """``[index..., value]`` of every cell with ``value >= threshold``, largest first."""
    idx = torch.nonzero(grid >= threshold)
    rows = [[*map(int, i), round(float(grid[tuple(i)]), 4)] for i in idx]
    return sorted(rows, key=lambda r: -r[-1])


def year_logit_diff(logits: torch.Tensor, years: torch.Tensor) -> float:
    """Mean over prompts of the last position's mean logit over the years after ``YY`` minus that over the others."""
    year_logits = logits[:, -1, GT_YEAR0 : GT_YEAR0 + GT_N_YEARS].double()
    later = (torch.arange(GT_N_YEARS)[None, :] > years[:, None]).double()
    per_prompt = (year_logits * later).sum(-1) / later.sum(-1) - (year_logits * (1 - later)).sum(-1) / (1 - later).sum(-1)
    return float(per_prompt.mean())


@torch.no_grad()
def analyse() -> Dict[str, Any]:
    """The circuit by exact patching on the saved model (through the bridge, as the tests do)."""
    from fastpatch.patching import get_act_patch_attn_head_out_all_pos, get_act_patch_mlp_out, get_act_patch_resid_pre

    model = load_greater_than_model()
    prompts = greater_than_prompts(**CIRCUIT_PROMPTS)
    metric = GreaterThanProbDiff(prompts.years)
    _, cache = model.run_with_cache(prompts.clean)
    clean_logits, corrupted_logits = model(prompts.clean), model(prompts.corrupted)
    clean_value, corrupted_value = metric(clean_logits).item(), metric(corrupted_logits).item()
    pred = clean_logits[:, -1].argmax(-1) - GT_YEAR0
    scale = clean_value - corrupted_value
    grids = {
        name: (fn(model, prompts.corrupted, cache, metric, progress=False) - corrupted_value) / scale
        for name, fn in (("heads", get_act_patch_attn_head_out_all_pos), ("mlp_out", get_act_patch_mlp_out),
                         ("resid_pre", get_act_patch_resid_pre))
    }
    return {
        "threshold": CIRCUIT_THRESHOLD,
        "clean_prob_diff": round(clean_value, 4),
        "corrupted_prob_diff": round(corrupted_value, 4),
        "clean_logit_diff": round(year_logit_diff(clean_logits, prompts.years), 4),
        "corrupted_logit_diff": round(year_logit_diff(corrupted_logits, prompts.years), 4),
        "clean_accuracy": round(float(((pred > prompts.years) & (pred < GT_N_YEARS)).float().mean()), 4),
        "year_position": prompts.year_position,
        "heads": _cells(grids["heads"], CIRCUIT_THRESHOLD),
        "mlps": _cells(grids["mlp_out"], CIRCUIT_THRESHOLD),
        "resid_positions": _cells(grids["resid_pre"], CIRCUIT_THRESHOLD),
        "normalized_effects": {k: [[round(v, 4) for v in row] for row in g.tolist()] for k, g in grids.items()},
    }


def write_circuit(meta: Dict[str, Any]) -> bool:
    """Measure the circuit of the saved model, store it in ``meta`` and the metadata file; whether
    it has at least one head and one MLP."""
    circuit = analyse()
    circuit["definition"] = {
        "prompts": "greater_than_prompts(64, seed=7): BOS f f Q YY g g Q, YY in [2, 98]; corrupted: YY = 01",
        "metric": "GreaterThanProbDiff: mean over prompts of p(y > YY) - p(y <= YY) over the years, last position",
        "logit_diff": "mean over prompts of (mean logit of the years after YY) - (mean logit of YY and the years before), "
                      "last position",
        "normalized_effects": "(patched - corrupted) / (clean - corrupted), clean activation patched into the corrupted "
                              "run: heads = get_act_patch_attn_head_out_all_pos [layer, head], mlp_out = "
                              "get_act_patch_mlp_out [layer, pos], resid_pre = get_act_patch_resid_pre [layer, pos]",
        "heads, mlps, resid_positions": f"cells with normalized effect >= {CIRCUIT_THRESHOLD}: [layer, head or pos, "
                                        "effect], largest first",
    }
    meta["circuit"] = circuit
    with open(GREATER_THAN_META, "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: v for k, v in circuit.items() if k != "normalized_effects"}, indent=1))
    print(json.dumps(circuit["normalized_effects"]))
    return bool(circuit["heads"]) and bool(circuit["mlps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a busy machine)")
    ap.add_argument("--analyse-only", action="store_true",
                    help="keep the shipped weights and metadata; re-measure and rewrite only the circuit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.analyse_only:
        meta = json.loads(GREATER_THAN_META.read_text())
        write_circuit(meta)
        return

    model, seconds = train(args.steps, args.batch, args.lr, args.seed)
    acc = task_accuracy(model)
    print(f"final: accuracy {acc['accuracy']:.4f}, prob diff {acc['prob_diff']:.4f}")

    GREATER_THAN_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().float().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": CONFIG}, GREATER_THAN_WEIGHTS)

    meta: Dict[str, Any] = {
        "architecture": "GPT2LMHeadModel",
        "config": CONFIG,
        "training": {
            "seed": args.seed, "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
            "optimizer": "AdamW (weight decay 0.01), 100-step linear warm-up then linear decay to 5%",
            "data": f"BOS, f_1..f_a, Q, YY, g_1..g_b, Q with a, b in [0, {MAX_FILL}] (one pair per batch), "
                    f"YY uniform in [{TRAIN_YEARS[0]}, {TRAIN_YEARS[1]}], fillers uniform over the 26 filler words",
            "loss": "cross-entropy at the last position against the uniform distribution over the years after YY",
            "threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
        "vocabulary": "0 BOS; 1..100 years 00..99 (token 1 + YY); 101 Q; 102..127 filler words",
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "accuracy_definition": "on 1024 fresh prompts over every template (a, b in [0, 4]), YY in [2, 98]: accuracy = "
                               "fraction whose last-position argmax over the vocabulary is a year after YY; prob_diff = "
                               "mean of p(y > YY) - p(y <= YY) over the year tokens",
    }
    with open(GREATER_THAN_META, "w") as f:  # analyse() loads the config from here
        json.dump(meta, f, indent=2)

    has_circuit = write_circuit(meta)
    ok = acc["accuracy"] > 0.9 and has_circuit
    if not ok:
        print("ERROR: accuracy <= 0.9, or no head / MLP in the circuit: do not ship these weights")
    print(f"trained in {seconds:.1f}s; wrote {GREATER_THAN_WEIGHTS} ({GREATER_THAN_WEIGHTS.stat().st_size} bytes), "
          f"{GREATER_THAN_META} ({GREATER_THAN_META.stat().st_size} bytes)")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
