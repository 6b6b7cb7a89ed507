"""fastpatch.patching equals transformer_lens.patching value by value, on every zoo architecture.

TransformerLens itself is the oracle. Its loop runs one forward per cell, so it is called once per
(model, sweep) in the richest result mode (a mapping of per-example metrics with a baseline) and
every other result mode's value is derived from that result (``_derive``); fastpatch is still run
and compared in every mode. ``test_derived_modes_equal_transformer_lens_calls`` calls
TransformerLens in every mode for one cheap sweep, which pins the derivation itself.
"""

from dataclasses import replace
from functools import partial

import pandas as pd
import pytest
import torch
from helpers import assert_close, assert_results_equal, assert_varies
from transformer_lens import patching as tl

from fastpatch import patching as fp

BACKENDS = ("hooks", "native")


def _ours(fn, *args, **kwargs):
    """fastpatch's result on every backend; they must all agree with the oracle."""
    return {backend: fn(*args, progress=False, backend=backend, **kwargs) for backend in BACKENDS}

# Every sweep TransformerLens 4.3 has (direct path patching has its own API and tests).
SWEEPS = sorted(
    n for n in dir(tl) if n.startswith("get_act_patch_") and not n.endswith("_every") and "direct_path" not in n
)
EVERY = ["get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every"]
# The longest oracle cases (most cells per TransformerLens loop): ``-m "not slow"`` skips them.
SLOW = {"get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_by_pos_every"}
MODES = ["scalar", "mean", "scalar_baseline", "none_baseline_mapping", "mapping_mean"]
RICH = "none_baseline_mapping"
CHEAP_SWEEP = "get_act_patch_attn_head_out_all_pos"  # one forward per (layer, head): the full mode matrix


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _mode_args(case, mode):
    """(metric, keyword arguments) for each way of calling a sweep."""
    return {
        "scalar": (case.scalar, {}),
        "mean": (case.per_example, {"reduce": "mean"}),
        "scalar_baseline": (case.scalar, {"baseline": True}),
        "none_baseline_mapping": (case.metrics, {"reduce": "none", "baseline": True}),
        "mapping_mean": (case.metrics, {"reduce": "mean"}),
        "none_mapping": (case.metrics, {"reduce": "none"}),
        "return_index_df": (case.scalar, {"return_index_df": True}),
    }[mode]


def _derive(rich, mode):
    """TransformerLens's result in ``mode``, from its result in the richest mode.

    ``rich`` has the metric axis first (``case.metrics``: "logprob", then "logit_gap"), the batch
    axis last and a ``[metric, batch]`` baseline. ``case.scalar`` is the batch mean of
    ``case.per_example``, the "logprob" metric, and TransformerLens's ``reduce="mean"`` is
    ``values.mean(-1)``: every other mode is a selection and a batch mean of ``rich``.
    """
    logprob = rich["logprob"]
    if mode == RICH:
        return rich
    if mode in ("scalar", "mean"):
        return logprob.values.mean(-1)
    if mode == "return_index_df":
        return logprob.values.mean(-1), rich.index_df
    if mode == "scalar_baseline":
        return replace(logprob, values=logprob.values.mean(-1), baseline=logprob.baseline.mean(-1),
                       metric_names=["metric"], reduced=True)
    if mode == "mapping_mean":
        return replace(rich, values=rich.values.mean(-1), baseline=None, reduced=True)
    if mode == "none_mapping":
        return replace(rich, baseline=None)
    raise ValueError(mode)


def _key(arg):
    """A memo key: an index table by its content, anything else (setters, names) by identity."""
    if isinstance(arg, pd.DataFrame):
        return tuple(arg.columns), tuple(map(tuple, arg.to_numpy().tolist()))
    return arg if isinstance(arg, str) else id(arg)


@pytest.fixture(scope="module")
def oracle(zoo_case):
    """``oracle(fn_name, *args, mode=..., **kwargs)``: TransformerLens's result, its loop run once per
    (zoo model, function, arguments) in this module, in the richest mode, other modes derived."""
    case, memo = zoo_case, {}

    def call(fn_name, *args, mode, **kwargs):
        key = (fn_name, *map(_key, args), *sorted((k, _key(v)) for k, v in kwargs.items()))
        if key not in memo:
            metric, rich_kwargs = _mode_args(case, RICH)
            fn = getattr(tl, fn_name)
            memo[key] = fn(case.model, case.corrupted, case.clean_cache, metric, *args, **kwargs, **rich_kwargs)
        return _derive(memo[key], mode)

    return call


def _has_hook(case, sweep_name):
    return not (sweep_name.endswith("resid_mid") and "blocks.0.hook_resid_mid" not in case.clean_cache)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sweep_name", _params(SWEEPS))
def test_sweep_matches_transformer_lens(zoo_case, oracle, sweep_name, mode):
    case = zoo_case
    if not _has_hook(case, sweep_name):
        pytest.skip("parallel attention+MLP blocks have no resid_mid (TransformerLens refuses too)")
    metric, kwargs = _mode_args(case, mode)
    ref = oracle(sweep_name, mode=mode)
    for ours in _ours(getattr(fp, sweep_name), case.model, case.corrupted, case.clean_cache, metric, **kwargs).values():
        assert_results_equal(ours, ref)
    assert_varies(ref if isinstance(ref, torch.Tensor) else ref.values, sweep_name)


@pytest.mark.parametrize("mode", ["scalar", "none_baseline_mapping", "scalar_baseline"])
@pytest.mark.parametrize("helper", _params(EVERY))
def test_every_helper_matches_transformer_lens(zoo_case, oracle, helper, mode):
    case = zoo_case
    metric, kwargs = _mode_args(case, mode)
    ref = oracle(helper, mode=mode)
    for ours in _ours(getattr(fp, helper), case.model, case.corrupted, case.clean_cache, metric, **kwargs).values():
        assert_results_equal(ours, ref)
    if case.model.cfg.n_key_value_heads not in (None, case.model.cfg.n_heads) and helper != "get_act_patch_block_every":
        values = ours if isinstance(ours, torch.Tensor) else ours.values
        kv = case.model.cfg.n_key_value_heads
        assert bool((values[2:4, ..., kv:] == 0).all()), "GQA k/v sweeps must be zero-padded to n_heads"


@pytest.mark.parametrize("mode", MODES)
def test_derived_modes_equal_transformer_lens_calls(zoo_case, oracle, mode):
    """The derivation of every result mode from the richest one, checked against TransformerLens
    called in that mode (one cheap sweep; the full mode matrix)."""
    case = zoo_case
    metric, kwargs = _mode_args(case, mode)
    ref = getattr(tl, CHEAP_SWEEP)(case.model, case.corrupted, case.clean_cache, metric, **kwargs)
    assert_results_equal(oracle(CHEAP_SWEEP, mode=mode), ref)
    for ours in _ours(getattr(fp, CHEAP_SWEEP), case.model, case.corrupted, case.clean_cache, metric, **kwargs).values():
        assert_results_equal(ours, ref)


def test_resid_mid_missing_on_parallel_blocks_is_a_clear_error():
    import zoo

    case = zoo.Case.build("neox")
    with pytest.raises(KeyError):
        tl.get_act_patch_resid_mid(case.model, case.corrupted, case.clean_cache, case.scalar)
    with pytest.raises(ValueError, match="resid_mid"):
        fp.get_act_patch_resid_mid(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)


@pytest.mark.parametrize(
    "activation, setter, columns",
    [
        ("z", tl.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
        ("pattern", tl.layer_head_dest_src_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos", "src_pos")),
        ("resid_pre", tl.layer_pos_patch_setter, ("layer", "pos")),
    ],
)
@pytest.mark.parametrize("mode", ["return_index_df", "none_baseline_mapping"])
def test_index_df_mode_matches_transformer_lens(zoo_case, oracle, activation, setter, columns, mode):
    case = zoo_case
    cfg, n_pos = case.model.cfg, case.corrupted.shape[1]
    limits = {"layer": cfg.n_layers, "pos": n_pos, "head": cfg.n_heads, "head_index": cfg.n_heads, "dest_pos": n_pos, "src_pos": n_pos}
    g = torch.Generator().manual_seed(7)
    index_df = pd.DataFrame({c: torch.randint(0, limits[c], (13,), generator=g).tolist() for c in columns})
    metric, kwargs = _mode_args(case, mode)
    args = (case.model, case.corrupted, case.clean_cache, metric, setter, activation)
    ref = oracle("generic_activation_patch", setter, activation, index_df=index_df, mode=mode)
    for ours in _ours(fp.generic_activation_patch, *args, index_df=index_df, **kwargs).values():
        assert_results_equal(ours, ref)


def _half_resid_setter(corrupted_activation, index, clean_activation):
    """A caller's own setter: patch only the first half of d_model at (layer, pos), in place."""
    layer, pos = index
    half = corrupted_activation.shape[-1] // 2
    corrupted_activation[:, pos, :half] = clean_activation[:, pos, :half]
    return corrupted_activation


def _mean_z_setter(corrupted_activation, index, clean_activation):
    """A caller's own setter that returns a new tensor: the batch-mean clean head output."""
    layer, head = index
    out = corrupted_activation.clone()
    out[:, :, head] = clean_activation[:, :, head].mean(0, keepdim=True)
    return out


@pytest.mark.parametrize(
    "activation, setter, axes",
    [("resid_pre", _half_resid_setter, ("layer", "pos")), ("z", _mean_z_setter, ("layer", "head"))],
)
def test_custom_patch_setter_matches_transformer_lens(zoo_case, activation, setter, axes):
    case = zoo_case
    args = (case.model, case.corrupted, case.clean_cache, case.metrics, setter, activation, axes)
    ref = tl.generic_activation_patch(*args, reduce="none")
    for ours in _ours(fp.generic_activation_patch, *args, reduce="none", chunk_size=4).values():
        assert_results_equal(ours, ref)
    assert_varies(ref.values)


# Chunkings compared with one chunk for everything. One cell per pass is checked on the block sweep;
# the by-position helper (hundreds of cells, one full forward each on the hook backend) is cut
# into uneven chunks that straddle its five sweeps instead.
CHUNKINGS = {
    "get_act_patch_block_every": ({"chunk_size": 1}, {"memory_budget": 1}),
    "get_act_patch_attn_head_by_pos_every": ({"chunk_size": 7}, {"chunk_size": 40}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("helper", sorted(CHUNKINGS))
def test_results_do_not_depend_on_chunk_size(zoo_case, oracle, helper, backend):
    case = zoo_case
    args = (case.model, case.corrupted, case.clean_cache, case.metrics)
    run = partial(getattr(fp, helper), *args, reduce="none", progress=False, backend=backend)
    all_in_one = run(chunk_size=10**6)
    assert_varies(all_in_one.values)
    for chunking in CHUNKINGS[helper]:
        assert_close(run(**chunking).values, all_in_one.values)
    assert_results_equal(all_in_one, oracle(helper, mode="none_mapping"))


def test_neuron_patching_with_a_custom_activation(zoo_case):
    """Activations the native backend does not patch (MLP neurons) run on the hook backend under auto."""
    case = zoo_case

    def neuron_setter(corrupted_activation, index, clean_activation):
        layer, neuron = index
        corrupted_activation[..., neuron] = clean_activation[..., neuron]
        return corrupted_activation

    n = case.model.cfg.d_mlp
    index_df = pd.DataFrame({"layer": [0, 1, 2, 2], "neuron": [0, n // 2, 1, n - 1]})
    args = (case.model, case.corrupted, case.clean_cache, case.metrics, neuron_setter, "post")
    ref = tl.generic_activation_patch(*args, index_df=index_df, reduce="none")
    ours = fp.generic_activation_patch(*args, index_df=index_df, reduce="none", progress=False)
    assert_results_equal(ours, ref)
    with pytest.raises(ValueError, match="does not patch"):
        fp.generic_activation_patch(*args, index_df=index_df, progress=False, backend="native")
