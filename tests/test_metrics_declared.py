"""The declared logit metrics beyond LogitDiff and LogProb (issue 15, item 7): Probability,
KLDivergence (ACDC), SpanLoss (induction), MultiTokenLogProb and BasketLogitDiff.

Each is checked against a plainly written callable (float64, prompt by prompt) on random logits,
then in a sweep on GPT-2, GPT-NeoX and LLaMA zoo models against TransformerLens's loop with those
plain callables, on both backends; the native backend must compute only the declared logits.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

from fastpatch import patching as fp
from fastpatch.engine.native import backend as native_backend
from fastpatch.metrics import (
    BasketLogitDiff,
    KLDivergence,
    LogitReads,
    MultiTokenLogProb,
    Probability,
    SpanLoss,
    logit_reads,
)

BATCH, POS, VOCAB = 3, 7, 29


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(BATCH, POS, VOCAB, generator=g)


def _ids(shape, seed, vocab=VOCAB):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- plain references: float64, prompt by prompt, position by position -------------------------
def _log_softmax(row):
    row = row.double()
    return row - (torch.log(torch.exp(row - row.max()).sum()) + row.max())


def plain_probability(logits, tokens, position=-1):
    return torch.stack([torch.exp(_log_softmax(logits[b, position]))[tokens[b]].sum() for b in range(len(tokens))]).float()


def plain_kl(logits, clean_logits, positions):
    out = []
    for b in range(logits.shape[0]):
        terms = []
        for p in positions:
            log_p, log_q = _log_softmax(clean_logits[b, p]), _log_softmax(logits[b, p])
            terms.append((torch.exp(log_p) * (log_p - log_q)).sum())
        out.append(sum(terms) / len(terms))
    return torch.stack(out).float()


def plain_span_loss(logits, tokens, start, stop):
    out = []
    for b in range(logits.shape[0]):
        losses = [-_log_softmax(logits[b, p])[tokens[b, p + 1]] for p in range(start, stop)]
        out.append(sum(losses) / len(losses))
    return torch.stack(out).float()


def plain_multi_token(logits, answer, position):
    n_pos = logits.shape[1]
    first = position % n_pos
    return torch.stack(
        [sum(_log_softmax(logits[b, first + i])[answer[b, i]] for i in range(answer.shape[1])) for b in range(len(answer))]
    ).float()


def plain_basket(logits, answer, wrong, position=-1):
    out = []
    for b in range(logits.shape[0]):
        row = logits[b, position].double()
        value = torch.log(torch.exp(row[answer[b]]).sum())
        if wrong is not None:
            value = value - torch.log(torch.exp(row[wrong[b]]).sum())
        out.append(value)
    return torch.stack(out).float()


def _pairs(clean_logits, tokens):
    """(declared metric, its plain callable) pairs over ``tokens`` ``[batch, pos]``."""
    n_pos = tokens.shape[1]
    answer = tokens[:, -1]
    basket = torch.stack([tokens[:, -1], tokens[:, -2], tokens[:, 0]], dim=1)
    wrong = torch.stack([tokens[:, 1], tokens[:, 2]], dim=1)
    multi = tokens[:, n_pos - 2 :]  # the last two tokens, predicted at positions -3 and -2
    return {
        "probability": (Probability(answer, per_prompt=True), lambda lg: plain_probability(lg, answer[:, None])),
        "probability_2": (Probability(basket[:, :2], position=-2, per_prompt=True), lambda lg: plain_probability(lg, basket[:, :2], -2)),
        "kl": (KLDivergence(clean_logits, positions=[1, -1], per_prompt=True), lambda lg: plain_kl(lg, clean_logits, [1, n_pos - 1])),
        "kl_last": (KLDivergence(clean_logits, per_prompt=True), lambda lg: plain_kl(lg, clean_logits, [n_pos - 1])),
        "span": (SpanLoss(tokens, 1, n_pos - 2, per_prompt=True), lambda lg: plain_span_loss(lg, tokens, 1, n_pos - 2)),
        "multi": (MultiTokenLogProb(multi, position=-3, per_prompt=True), lambda lg: plain_multi_token(lg, multi, -3)),
        "basket": (BasketLogitDiff(basket, wrong, per_prompt=True), lambda lg: plain_basket(lg, basket, wrong)),
        "basket_alone": (BasketLogitDiff(basket, position=-2, per_prompt=True), lambda lg: plain_basket(lg, basket, None, -2)),
    }


# ---- values and the select / from_selected protocol on random logits ---------------------------
def test_each_metric_equals_its_plain_callable_and_select_then_from_selected_is_call():
    clean, logits, tokens = _logits(1), _logits(2), _ids((BATCH, POS), seed=3)
    for name, (metric, plain) in _pairs(clean, tokens).items():
        expected = plain(logits)
        assert_close(metric(logits), expected)
        assert_varies(expected, name)
        reads = logit_reads(metric)
        assert isinstance(reads, LogitReads), name
        selected = metric.select(logits)
        positions = list(reads.positions)
        rows = logits[:, positions] if reads.position is None else logits[:, reads.position]
        if reads.tokens is not None:
            assert reads.position is not None  # token columns are only declared at one position here
            rows = rows.gather(-1, reads.tokens)
        assert torch.equal(selected, rows), name
        assert torch.equal(metric.from_selected(selected.clone()), metric(logits)), name
    # the scalar forms are the mean over prompts
    scalar = KLDivergence(clean, positions=[0, 3])
    assert_close(scalar(logits), plain_kl(logits, clean, [0, 3]).mean())
    assert_close(SpanLoss(tokens, 0)(logits), plain_span_loss(logits, tokens, 0, POS - 1).mean())


def test_reads_of_several_positions():
    clean, tokens = _logits(4), _ids((BATCH, POS), seed=5)
    span = SpanLoss(tokens, 2, 5)
    assert span.reads.position is None and span.reads.positions == (2, 3, 4) and span.reads.tokens is None
    assert span.reads == LogitReads((2, 3, 4), None) != LogitReads(2, None)
    assert hash(span.reads) == hash(LogitReads([2, 3, 4], None))
    assert MultiTokenLogProb(tokens[:, :2], position=-3).reads.positions == (-3, -2)
    assert KLDivergence(clean).reads == LogitReads(-1, None)
    assert BasketLogitDiff(tokens[:, :2]).reads == LogitReads(-1, tokens[:, :2])


def test_bad_input_is_refused_by_name():
    clean, tokens = _logits(6), _ids((BATCH, POS), seed=7)
    with pytest.raises(ValueError, match="start < stop"):
        SpanLoss(tokens, 4, 4)
    with pytest.raises(ValueError, match="n_tokens - 1"):
        SpanLoss(tokens, 0, POS)
    with pytest.raises(ValueError, match="run past the last position"):
        MultiTokenLogProb(tokens[:, :2], position=-1)
    with pytest.raises(ValueError, match="out of range"):
        KLDivergence(clean, positions=[POS])
    with pytest.raises(ValueError, match="non-finite"):
        KLDivergence(torch.full_like(clean, float("nan")))
    with pytest.raises(ValueError, match="at least one position"):
        LogitReads((), None)
    with pytest.raises(ValueError, match="out of range"):
        SpanLoss(tokens, 1)(_logits(8)[:, :3])
    with pytest.raises(ValueError, match="d_vocab"):
        KLDivergence(clean).from_selected(torch.zeros(BATCH, VOCAB + 1))


# ---- sweeps against TransformerLens's loop, both backends --------------------------------------
SWEEP = dict(
    patch_setter=tl.layer_pos_patch_setter,
    activation_name="resid_pre",
    index_df=pd.DataFrame({"layer": [0, 1, 0, 2, 1, 2], "pos": [0, 1, 2, 3, 4, 5]}),
)


@pytest.fixture(scope="module", params=("gpt2", "neox", "llama"))
def sweep_case(request):
    case = zoo.Case.build(request.param, n_pos=6)
    with torch.no_grad():
        clean_logits = case.model(case.clean)
    pairs = _pairs(clean_logits, case.corrupted)
    declared = {name: metric for name, (metric, _) in pairs.items()}
    plain = {name: fn for name, (_, fn) in pairs.items()}
    # resid_pre cells whose patches start at every position, so some read positions lie before a patch's first change
    ref = tl.generic_activation_patch(case.model, case.corrupted, case.clean_cache, plain, **SWEEP, reduce="none")
    return case, declared, ref


def test_declared_metrics_in_a_sweep_equal_transformer_lens_on_both_backends(sweep_case, monkeypatch):
    case, declared, ref = sweep_case
    args = (case.model, case.corrupted, case.clean_cache)
    for i, name in enumerate(ref.metric_names):
        assert_varies(ref.values[i], name)
    hooks = fp.generic_activation_patch(*args, declared, **SWEEP, reduce="none", backend="hooks", progress=False)
    assert_close(hooks.values, ref.values)

    def no_full_logits(*a, **k):
        raise AssertionError("the native backend computed full logits for declared metrics")

    widths = []
    real_forward = native_backend.forward_from_entries

    def forward(*a, **k):
        x, order = real_forward(*a, **k)
        widths.append((a[2], x.shape[1]))  # (first changed position, positions through the last block)
        return x, order

    monkeypatch.setattr(native_backend, "cell_logits", no_full_logits)
    monkeypatch.setattr(native_backend, "forward_from_entries", forward)
    native = fp.generic_activation_patch(*args, declared, **SWEEP, reduce="none", backend="native", progress=False)
    assert_close(native.values, ref.values)
    n_pos = case.corrupted.shape[1]
    # the metrics read positions 1..n_pos-1: the last block runs from max(start, 1) only
    assert widths and all(width == n_pos - max(start, 1) for start, width in widths)
    # one metric alone: a single read position (the last), so one position through the last block
    widths.clear()
    alone = fp.generic_activation_patch(*args, declared["probability"], **SWEEP, reduce="none", backend="native", progress=False)
    assert_close(alone.values, ref.values[ref.metric_names.index("probability")])
    assert widths and all(width == 1 for _, width in widths)
