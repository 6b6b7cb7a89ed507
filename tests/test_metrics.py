"""fastpatch.metrics: values against plainly written formulas, the select/from_selected split,
NormalizedEffect, input errors, and use through transformer_lens.patching and fastpatch.patching."""

import pytest
import torch
import zoo
from helpers import assert_close, assert_results_equal, assert_varies
from transformer_lens import patching as tl

from fastpatch import patching as fp
from fastpatch.metrics import LogitDiff, LogitMetric, LogitReads, LogProb, NormalizedEffect, logit_reads

BATCH, POS, VOCAB = 4, 6, 37


def _logits(seed=0, batch=BATCH, pos=POS, vocab=VOCAB, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, pos, vocab, generator=g)).to(dtype)


def _ids(shape, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def _plain_logit_diff(logits, answer, wrong, position=-1):
    """Per prompt: mean of answer logits minus mean of wrong logits, written out prompt by prompt."""
    answer = answer.reshape(answer.shape[0], -1)
    wrong = wrong.reshape(wrong.shape[0], -1)
    out = []
    for b in range(logits.shape[0]):
        row = logits[b, position].float()
        out.append(torch.stack([row[t] for t in answer[b]]).mean() - torch.stack([row[t] for t in wrong[b]]).mean())
    return torch.stack(out)


def _plain_log_prob(logits, tokens, position=-1):
    """Per prompt: sum over the tokens of log(softmax) computed from exp / sum exp in float64."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    out = []
    for b in range(logits.shape[0]):
        row = logits[b, position].double()
        log_z = torch.log(torch.exp(row - row.max()).sum()) + row.max()
        out.append(sum(row[t] - log_z for t in tokens[b]))
    return torch.stack(out).float()


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("position", [-1, 2, -4, 0])
@pytest.mark.parametrize("n_answer,n_wrong", [(None, None), (1, 1), (3, 2), (None, 4)])
def test_logit_diff_values(position, n_answer, n_wrong):
    logits = _logits()
    answer = _ids((BATCH,) if n_answer is None else (BATCH, n_answer), seed=2)
    wrong = _ids((BATCH,) if n_wrong is None else (BATCH, n_wrong), seed=3)
    expected = _plain_logit_diff(logits, answer, wrong, position)
    per = LogitDiff(answer, wrong, position=position, per_prompt=True)(logits)
    scalar = LogitDiff(answer, wrong, position=position)(logits)
    assert per.shape == (BATCH,) and per.dtype == torch.float32
    assert scalar.shape == () and scalar.dtype == torch.float32
    assert_close(per, expected)
    assert_close(scalar, expected.mean())


@pytest.mark.parametrize("position", [-1, 1, -3])
@pytest.mark.parametrize("n", [None, 1, 3])
def test_log_prob_values(position, n):
    logits = _logits(seed=4)
    tokens = _ids((BATCH,) if n is None else (BATCH, n), seed=5)
    expected = _plain_log_prob(logits, tokens, position)
    per = LogProb(tokens, position=position, per_prompt=True)(logits)
    scalar = LogProb(tokens, position=position)(logits)
    assert per.shape == (BATCH,) and per.dtype == torch.float32
    assert scalar.shape == ()
    assert_close(per, expected)
    assert_close(scalar, expected.mean())
    assert (per <= 0).all()


def test_log_prob_of_half_precision_logits_is_computed_in_float32():
    logits = _logits(seed=6, dtype=torch.bfloat16)
    tokens = _ids((BATCH, 2), seed=7)
    out = LogProb(tokens, per_prompt=True)(logits)
    assert out.dtype == torch.float32
    assert_close(out, _plain_log_prob(logits.float(), tokens))
    diff = LogitDiff(tokens[:, 0], tokens[:, 1], per_prompt=True)(logits)
    assert diff.dtype == torch.float32
    assert_close(diff, _plain_logit_diff(logits.float(), tokens[:, 0], tokens[:, 1]))


def test_several_answers_is_mean_not_sum():
    """Two identical answers give the same logit difference as one."""
    logits = _logits(seed=8)
    answer, wrong = _ids((BATCH,), seed=9), _ids((BATCH,), seed=10)
    one = LogitDiff(answer, wrong, per_prompt=True)(logits)
    two = LogitDiff(torch.stack([answer, answer], 1), torch.stack([wrong, wrong, wrong], 1), per_prompt=True)(logits)
    assert_close(two, one)


def test_several_tokens_log_prob_is_sum():
    logits = _logits(seed=11)
    tokens = _ids((BATCH, 3), seed=12)
    parts = [LogProb(tokens[:, i], per_prompt=True)(logits) for i in range(3)]
    assert_close(LogProb(tokens, per_prompt=True)(logits), sum(parts))


# ---------------------------------------------------------------------------------------------
# The select / from_selected protocol


def _metrics():
    answer, wrong = _ids((BATCH, 2), seed=13), _ids((BATCH, 3), seed=14)
    tokens = _ids((BATCH, 2), seed=15)
    clean, corrupted = _logits(seed=16), _logits(seed=17)
    base = {
        "diff": LogitDiff(answer, wrong),
        "diff_per": LogitDiff(answer[:, 0], wrong[:, 0], position=2, per_prompt=True),
        "logprob": LogProb(tokens, position=-2),
        "logprob_per": LogProb(tokens[:, 0], per_prompt=True),
    }
    normalized = {f"norm_{k}": NormalizedEffect.from_logits(m, clean, corrupted) for k, m in base.items()}
    return {**base, **normalized}


@pytest.mark.parametrize("name", sorted(_metrics()))
def test_select_then_from_selected_is_call_bit_for_bit(name):
    metric = _metrics()[name]
    logits = _logits(seed=18)
    reads = logit_reads(metric)
    assert isinstance(reads, LogitReads) and reads is metric.reads
    selected = metric.select(logits)
    if reads.tokens is None:
        assert selected.shape == (BATCH, VOCAB)
        assert torch.equal(selected, logits[:, reads.position])
    else:
        assert reads.tokens.dtype == torch.int64 and reads.tokens.shape[0] == BATCH
        assert selected.shape == reads.tokens.shape
        assert torch.equal(selected, logits[:, reads.position].gather(-1, reads.tokens))
    # A backend computing only these logits passes an equal tensor, not the same object.
    value = metric.from_selected(selected.clone())
    assert torch.equal(value, metric(logits))
    assert value.shape == ((BATCH,) if metric.per_prompt else ())


def test_reads_declare_position_and_tokens():
    answer, wrong = _ids((BATCH, 2), seed=19), _ids((BATCH,), seed=20)
    diff = LogitDiff(answer, wrong, position=3)
    assert diff.reads.position == 3
    assert torch.equal(diff.reads.tokens, torch.cat([answer, wrong[:, None]], dim=1))
    assert LogProb(wrong, position=-2).reads == LogitReads(-2, None)
    assert LogitDiff(answer, wrong, position=3).reads == diff.reads
    assert LogitDiff(answer, wrong, position=2).reads != diff.reads
    assert hash(LogitDiff(answer, wrong, position=3).reads) == hash(diff.reads)
    assert isinstance(diff, LogitMetric) and isinstance(LogProb(wrong), LogitMetric)


def test_plain_callables_declare_nothing():
    plain = lambda logits: logits[:, -1, 0].mean()  # noqa: E731
    assert logit_reads(plain) is None
    assert logit_reads(zoo._logit_gap(_ids((BATCH,)), _ids((BATCH,), seed=2))) is None
    norm = NormalizedEffect(plain, 2.0, -1.0)
    assert logit_reads(norm) is None and norm.reads is None
    with pytest.raises(NotImplementedError):
        norm.select(_logits())
    with pytest.raises(NotImplementedError):
        norm.from_selected(torch.zeros(BATCH, 2))
    logits = _logits(seed=21)
    assert_close(norm(logits), (plain(logits) + 1.0) / 3.0)


def test_metrics_are_differentiable():
    """Attribution patching takes gradients of the metric with respect to the logits."""
    logits = _logits(seed=22).requires_grad_(True)
    metric = NormalizedEffect(LogitDiff(_ids((BATCH,), seed=23), _ids((BATCH,), seed=24)), 2.0, 0.5)
    metric(logits).backward()
    grad = logits.grad
    assert grad[:, :-1].abs().sum() == 0 and grad[:, -1].abs().sum() > 0
    logits.grad = None
    LogProb(_ids((BATCH,), seed=25))(logits).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, -1].abs().sum() > 0


@pytest.mark.gpu
def test_index_tensors_follow_the_logits_device():
    logits = _logits(seed=26).cuda()
    tokens = _ids((BATCH, 2), seed=27)
    for metric in (LogitDiff(tokens[:, 0], tokens[:, 1]), LogProb(tokens, per_prompt=True)):
        norm = NormalizedEffect.from_logits(metric, _logits(seed=28).cuda(), _logits(seed=29).cuda())
        for m in (metric, norm):
            out = m(logits)
            assert out.device == logits.device
            assert torch.equal(m.from_selected(m.select(logits)), out)
            assert_close(out.cpu(), m(logits.cpu()))


# ---------------------------------------------------------------------------------------------
# NormalizedEffect


@pytest.mark.parametrize("per_prompt", [False, True])
@pytest.mark.parametrize("kind", ["diff", "logprob"])
def test_normalized_effect_is_zero_at_corrupted_and_one_at_clean(kind, per_prompt):
    clean, corrupted, other = _logits(seed=30), _logits(seed=31), _logits(seed=32)
    tokens = _ids((BATCH, 2), seed=33)
    if kind == "diff":
        inner = LogitDiff(tokens[:, 0], tokens[:, 1], per_prompt=per_prompt)
    else:
        inner = LogProb(tokens, per_prompt=per_prompt)
    norm = NormalizedEffect.from_logits(inner, clean, corrupted)
    assert norm.per_prompt == per_prompt and norm.reads is inner.reads
    shape = (BATCH,) if per_prompt else ()
    assert norm.clean_value.shape == shape and norm.corrupted_value.shape == shape
    assert_close(norm(corrupted), torch.zeros(shape))
    assert_close(norm(clean), torch.ones(shape))
    c, k = inner(clean), inner(corrupted)
    assert_close(norm(other), (inner(other) - k) / (c - k))


def test_normalized_effect_scalar_values_broadcast_over_prompts():
    inner = LogitDiff(_ids((BATCH,), seed=34), _ids((BATCH,), seed=35), per_prompt=True)
    logits = _logits(seed=36)
    out = NormalizedEffect(inner, 3.0, torch.tensor(1.0))(logits)
    assert out.shape == (BATCH,)
    assert_close(out, (inner(logits) - 1.0) / 2.0)


def test_normalized_effect_undefined_when_clean_equals_corrupted():
    inner = LogitDiff(_ids((BATCH,), seed=37), _ids((BATCH,), seed=38))
    with pytest.raises(ValueError, match="undefined"):
        NormalizedEffect(inner, 1.5, 1.5)
    logits = _logits(seed=39)
    with pytest.raises(ValueError, match="undefined"):
        NormalizedEffect.from_logits(inner, logits, logits.clone())
    per = LogitDiff(_ids((BATCH,), seed=37), _ids((BATCH,), seed=38), per_prompt=True)
    clean, corrupted = torch.arange(BATCH, dtype=torch.float32), torch.arange(BATCH, dtype=torch.float32) - 1
    corrupted[2] = clean[2]
    with pytest.raises(ValueError, match=r"undefined") as info:
        NormalizedEffect(per, clean, corrupted)
    assert "[2]" in str(info.value)
    # Clean and corrupted logits that agree for one prompt only.
    clean_logits, corrupted_logits = _logits(seed=40), _logits(seed=41)
    corrupted_logits[1] = clean_logits[1]
    with pytest.raises(ValueError, match="undefined"):
        NormalizedEffect.from_logits(per, clean_logits, corrupted_logits)


def test_normalized_effect_bad_values():
    scalar = LogitDiff(_ids((BATCH,), seed=42), _ids((BATCH,), seed=43))
    per = LogitDiff(_ids((BATCH,), seed=42), _ids((BATCH,), seed=43), per_prompt=True)
    with pytest.raises(ValueError, match="per_prompt=True"):
        NormalizedEffect(scalar, torch.ones(BATCH), torch.zeros(BATCH))
    with pytest.raises(ValueError, match="batch of 4"):
        NormalizedEffect(per, torch.ones(BATCH + 1), 0.0)
    with pytest.raises(ValueError, match="scalar or a \\[batch\\]"):
        NormalizedEffect(per, torch.ones(BATCH, 1), 0.0)
    with pytest.raises(ValueError, match="finite"):
        NormalizedEffect(per, float("nan"), 0.0)
    with pytest.raises(ValueError, match="callable"):
        NormalizedEffect("not a metric", 1.0, 0.0)
    with pytest.raises(ValueError, match="number or a tensor"):
        NormalizedEffect(per, "one", 0.0)


# ---------------------------------------------------------------------------------------------
# Input errors


@pytest.mark.parametrize(
    "answer,wrong,match",
    [
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 2, 3, 4]), "integer dtype"),
        (torch.tensor([1, 2, 3, 4]), torch.tensor([True, False, True, False]), "integer dtype"),
        (torch.zeros(BATCH, 2, 2, dtype=torch.long), torch.tensor([1, 2, 3, 4]), r"\[batch\] or \[batch, n\]"),
        (torch.tensor(3), torch.tensor(4), r"\[batch\] or \[batch, n\]"),
        (torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3]), "expected 4"),
        (torch.tensor([1, 2, 3, 4]), torch.zeros(BATCH, 0, dtype=torch.long), "at least one token"),
        (torch.tensor([1, -2, 3, 4]), torch.tensor([1, 2, 3, 4]), "negative"),
        ([1, 2, 3, 4], torch.tensor([1, 2, 3, 4]), "torch.Tensor"),
    ],
)
def test_logit_diff_bad_tokens(answer, wrong, match):
    with pytest.raises(ValueError, match=match):
        LogitDiff(answer, wrong)


def test_log_prob_bad_tokens():
    with pytest.raises(ValueError, match="integer dtype"):
        LogProb(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, n\]"):
        LogProb(torch.zeros(2, 2, 2, dtype=torch.long))


def test_small_integer_dtypes_are_accepted():
    logits = _logits(seed=44)
    answer, wrong = _ids((BATCH,), seed=45), _ids((BATCH,), seed=46)
    ref = LogitDiff(answer, wrong, per_prompt=True)(logits)
    ours = LogitDiff(answer.to(torch.int32), wrong.to(torch.int16), per_prompt=True)
    assert ours.reads.tokens.dtype == torch.int64
    assert torch.equal(ours(logits), ref)


def test_bad_position_and_logits():
    answer, wrong = _ids((BATCH,), seed=47), _ids((BATCH,), seed=48)
    with pytest.raises(ValueError, match="position must be an int"):
        LogitDiff(answer, wrong, position=1.0)
    with pytest.raises(ValueError, match="position must be an int"):
        LogProb(answer, position=True)
    logits = _logits(seed=49)
    for metric in (LogitDiff(answer, wrong, position=POS), LogProb(answer, position=-POS - 1)):
        with pytest.raises(ValueError, match="out of range"):
            metric(logits)
    metric = LogitDiff(answer, wrong)
    with pytest.raises(ValueError, match="batch of 4 prompts"):
        metric(logits[:3])
    with pytest.raises(ValueError, match=r"\[batch, pos, d_vocab\]"):
        metric(logits[:, -1])
    with pytest.raises(ValueError, match="d_vocab=5"):
        metric(logits[..., :5])
    with pytest.raises(ValueError, match=r"\[batch=4, d_vocab\]"):
        LogProb(answer).from_selected(logits[:3, -1])


def test_logit_reads_validation():
    with pytest.raises(ValueError, match="int64"):
        LogitReads(-1, torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int64"):
        LogitReads(-1, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(Exception):
        LogitReads(-1, None).position = 2  # frozen


# ---------------------------------------------------------------------------------------------
# Through transformer_lens.patching and fastpatch.patching


@pytest.fixture(scope="module")
def case():
    return zoo.Case.build("gpt2")


@pytest.fixture(scope="module")
def case_metrics(case):
    answer, wrong = case.clean[:, -1], case.corrupted[:, -1]
    with torch.no_grad():
        clean_logits = case.model(case.clean)
        corrupted_logits = case.model(case.corrupted)
    several = torch.stack([answer, (answer + 1) % zoo.VOCAB], dim=1)
    return {
        "diff": LogitDiff(answer, wrong),
        "diff_several": LogitDiff(several, wrong),
        "logprob": LogProb(answer),
        "diff_at_3": LogitDiff(answer, wrong, position=3),
        "norm_diff": NormalizedEffect.from_logits(LogitDiff(answer, wrong), clean_logits, corrupted_logits),
        "diff_per": LogitDiff(answer, wrong, per_prompt=True),
        "logprob_per": LogProb(several, per_prompt=True),
        "norm_logprob_per": NormalizedEffect.from_logits(LogProb(answer, per_prompt=True), clean_logits, corrupted_logits),
    }


SCALAR = ["diff", "diff_several", "logprob", "diff_at_3", "norm_diff"]
PER_PROMPT = ["diff_per", "logprob_per", "norm_logprob_per"]


@pytest.mark.parametrize("name", SCALAR)
def test_scalar_metric_through_resid_pre_sweeps(case, case_metrics, name):
    metric = case_metrics[name]
    ref = tl.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric)
    ours = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric, progress=False)
    assert ref.shape == (case.model.cfg.n_layers, case.clean.shape[1])
    assert_results_equal(ours, ref)
    assert_varies(ref, name)


@pytest.mark.parametrize("reduce", ["mean", "none"])
@pytest.mark.parametrize("name", PER_PROMPT)
def test_per_prompt_metric_through_resid_pre_sweeps(case, case_metrics, name, reduce):
    metric = case_metrics[name]
    ref = tl.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric, reduce=reduce)
    ours = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric, reduce=reduce, progress=False)
    assert_results_equal(ours, ref)
    values = ref if isinstance(ref, torch.Tensor) else ref.values
    if reduce == "none":
        assert values.shape[-1] == case.clean.shape[0]
    assert_varies(values, name)


def test_logit_diff_equals_a_hand_written_metric_in_a_sweep(case):
    """LogitDiff(per_prompt=True) gives the zoo's hand-written logit gap, cell by cell."""
    metric = LogitDiff(case.clean[:, -1], case.corrupted[:, -1], per_prompt=True)
    ref = tl.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, case.metrics["logit_gap"], reduce="mean")
    ours = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric, reduce="mean", progress=False)
    assert_close(ours, ref)


def test_normalized_effect_sweep_is_zero_where_clean_equals_corrupted(case, case_metrics):
    """Positions before the prompts first differ (2) hold equal activations: patching them changes nothing."""
    metric = case_metrics["norm_diff"]
    ours = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metric, progress=False)
    assert_close(ours[:, :2], torch.zeros_like(ours[:, :2]), rtol=1e-4)


def test_metric_mapping_through_resid_pre_sweeps(case, case_metrics):
    metrics = {name: case_metrics[name] for name in PER_PROMPT}
    ref = tl.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, metrics, reduce="none", baseline=True)
    ours = fp.get_act_patch_resid_pre(
        case.model, case.corrupted, case.clean_cache, metrics, reduce="none", baseline=True, progress=False
    )
    assert_results_equal(ours, ref)
    # The baseline is the corrupted run: the normalised effect is 0 there.
    assert_close(ref.baseline[2], torch.zeros(case.clean.shape[0]), rtol=1e-4)
