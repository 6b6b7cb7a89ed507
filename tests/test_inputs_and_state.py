"""Bad input gets a clear ValueError, and no call leaves a hook, flag or mode changed behind it."""

import pandas as pd
import pytest
import torch
import zoo
from helpers import assert_close

from fastpatch import hook_count, model_flags
from fastpatch import patching as fp


@pytest.fixture(scope="module")
def case():
    return zoo.Case.build("gpt2")


@pytest.fixture(scope="module")
def gqa_case():
    return zoo.Case.build("llama")


def _assert_untouched(model, flags_before):
    assert hook_count(model) == 0
    assert model_flags(model) == flags_before
    assert not model.training


def _call(case, sweep="get_act_patch_attn_head_out_all_pos", tokens=None, cache=None, metric=None, **kwargs):
    return getattr(fp, sweep)(
        case.model,
        case.corrupted if tokens is None else tokens,
        case.clean_cache if cache is None else cache,
        case.scalar if metric is None else metric,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    "tokens, message",
    [
        (lambda c: c.corrupted[0], "2-D"),
        (lambda c: c.corrupted[None], "2-D"),
        (lambda c: c.corrupted.float(), "integer"),
        (lambda c: c.corrupted.tolist(), "torch.Tensor"),
        (lambda c: c.corrupted + zoo.VOCAB, "vocabulary"),
        (lambda c: c.corrupted[:, :0], "empty"),
    ],
)
def test_bad_tokens(case, tokens, message):
    flags = model_flags(case.model)
    with pytest.raises(ValueError, match=message):
        _call(case, tokens=tokens(case))
    _assert_untouched(case.model, flags)


def test_clean_cache_from_another_sequence_length(case):
    with torch.no_grad():
        _, short_cache = case.model.run_with_cache(case.clean[:, :-1])
    with pytest.raises(ValueError, match="different sequence length"):
        _call(case, cache=short_cache)
    with pytest.raises(ValueError, match="different sequence length"):
        _call(case, sweep="get_act_patch_attn_head_pattern_all_pos", cache=short_cache)


def test_clean_cache_from_another_model(case):
    other = zoo.gpt2(d_model=36)
    with torch.no_grad():
        _, other_cache = other.run_with_cache(case.clean)
    with pytest.raises(ValueError, match="different model"):
        _call(case, cache=other_cache)
    with pytest.raises(ValueError, match="different model"):
        _call(case, sweep="get_act_patch_resid_pre", cache=other_cache)


def test_clean_cache_with_other_batch_size(case):
    with torch.no_grad():
        _, cache = case.model.run_with_cache(case.clean[:2])
    with pytest.raises(ValueError, match="batch size"):
        _call(case, cache=cache)


def test_clean_cache_with_nan(case):
    cache = dict(case.clean_cache.items())
    bad = cache["blocks.1.attn.hook_z"].clone()
    bad[0, 0, 0, 0] = float("nan")
    cache["blocks.1.attn.hook_z"] = bad
    with pytest.raises(ValueError, match="NaN"):
        _call(case, cache=cache)


@pytest.mark.parametrize(
    "metric, kwargs, message",
    [
        (lambda c: c.per_example, {}, "must return a scalar under reduce='scalar'"),
        (lambda c: c.scalar, {"reduce": "none"}, r"must return a \[batch\] tensor"),
        (lambda c: c.scalar, {"reduce": "mean"}, r"must return a \[batch\] tensor"),
        (lambda c: (lambda logits: c.per_example(logits)[:-1]), {"reduce": "none"}, r"\[batch\] tensor of length 3"),
        (lambda c: {}, {}, "at least one metric"),
        (lambda c: c.scalar, {"reduce": "sum"}, "reduce must be one of"),
        (lambda c: c.scalar, {"baseline": True, "chunk_size": 0}, "chunk_size"),
        (lambda c: c.scalar, {"memory_budget": -5}, "memory_budget"),
    ],
)
def test_bad_metric_or_options(case, metric, kwargs, message):
    flags = model_flags(case.model)
    with pytest.raises(ValueError, match=message):
        _call(case, metric=metric(case), **kwargs)
    _assert_untouched(case.model, flags)


def test_return_index_df_with_a_result_is_refused(case):
    with pytest.raises(ValueError, match="return_index_df"):
        fp.generic_activation_patch(
            case.model, case.corrupted, case.clean_cache, case.per_example, fp.layer_pos_patch_setter,
            "resid_pre", ("layer", "pos"), return_index_df=True, reduce="none", progress=False,
        )


def test_training_mode_is_refused_and_kept(case):
    model = case.model
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation mode"):
            _call(case)
        assert model.training, "the check must not change the caller's mode"
    finally:
        model.eval()


@pytest.mark.parametrize(
    "activation, setter, df, message",
    [
        ("z", fp.layer_head_vector_patch_setter, {"layer": [0, 3], "head": [0, 1]}, "'layer' is out of range"),
        ("z", fp.layer_head_vector_patch_setter, {"layer": [0, 1], "head": [0, 3]}, "'head' is out of range"),
        ("resid_pre", fp.layer_pos_patch_setter, {"layer": [0, 1], "pos": [-1, 2]}, "'pos' is out of range"),
        ("pattern", fp.layer_head_dest_src_pos_pattern_patch_setter,
         {"layer": [0], "head_index": [0], "dest_pos": [1], "src_pos": [5]}, "'src_pos' is out of range"),
        ("resid_pre", fp.layer_pos_patch_setter, {"pos": [0], "layer": [0]}, "first column must be 'layer'"),
        ("resid_pre", fp.layer_pos_patch_setter, {"layer": [0.5], "pos": [0]}, "integers"),
    ],
)
def test_index_df_out_of_range(case, activation, setter, df, message):
    flags = model_flags(case.model)
    with pytest.raises(ValueError, match=message):
        fp.generic_activation_patch(
            case.model, case.corrupted, case.clean_cache, case.scalar, setter, activation,
            index_df=pd.DataFrame(df), progress=False,
        )
    _assert_untouched(case.model, flags)


def test_gqa_kv_heads_range(gqa_case):
    """On a grouped-query model K/V indices address the K/V heads (2 here), query heads 4."""
    df = pd.DataFrame({"layer": [0], "head": [2]})
    with pytest.raises(ValueError, match="'head' is out of range"):
        fp.generic_activation_patch(
            gqa_case.model, gqa_case.corrupted, gqa_case.clean_cache, gqa_case.scalar,
            fp.layer_head_vector_patch_setter, "k", index_df=df, progress=False,
        )
    out = fp.generic_activation_patch(
        gqa_case.model, gqa_case.corrupted, gqa_case.clean_cache, gqa_case.scalar,
        fp.layer_head_vector_patch_setter, "q", index_df=df, progress=False,
    )
    assert out.shape == (1,)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("backend", ["hooks", "native"])
def test_no_state_left_after_metric_raises_mid_sweep(case, backend):
    model = case.model
    model.set_use_attn_result(True)  # a caller's non-default flag must survive too
    # and a caller's hook (a model carrying one runs only with user_hooks="per_cell", on the hook backend)
    n_hooks = int(backend == "hooks")
    if n_hooks:
        model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda act, hook: act)
    user_hooks = "per_cell" if n_hooks else "refuse"
    try:
        flags = model_flags(model)
        hooks_before = hook_count(model)
        calls = []

        def metric(logits):
            calls.append(1)
            if len(calls) == 4:
                raise _Boom("metric failed")
            return case.scalar(logits)

        with pytest.raises(_Boom):
            _call(case, metric=metric, chunk_size=2, backend=backend, user_hooks=user_hooks)
        assert hook_count(model) == hooks_before == n_hooks
        assert model_flags(model) == flags
        result = _call(case, backend=backend, user_hooks=user_hooks)
        reference = _call(case, chunk_size=1, backend="hooks", user_hooks=user_hooks)
        assert_close(result, reference)
    finally:
        model.reset_hooks(including_permanent=True)
        model.set_use_attn_result(False)
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", ["hooks", "native"])
def test_no_state_left_after_setter_changes_flags_and_adds_hooks(case, backend):
    model = case.model
    flags = model_flags(model)

    def meddling_setter(corrupted_activation, index, clean_activation):
        model.cfg.use_hook_mlp_in = not model.cfg.use_hook_mlp_in
        model.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda act, hook: act)
        return fp.layer_pos_patch_setter(corrupted_activation, index, clean_activation)

    fp.generic_activation_patch(
        model, case.corrupted, case.clean_cache, case.scalar, meddling_setter, "resid_pre",
        ("layer", "pos"), progress=False, backend=backend,
    )
    _assert_untouched(model, flags)


def test_every_helper_refuses_unknown_keywords(case):
    with pytest.raises(TypeError, match="unexpected keyword"):
        fp.get_act_patch_block_every(case.model, case.corrupted, case.clean_cache, case.scalar, reduction="mean")
