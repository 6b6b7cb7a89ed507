"""fastpatch.patching equals transformer_lens.patching value by value, on every zoo architecture.

TransformerLens itself is the oracle: each test calls its function with the same arguments.
"""

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


def _mode_args(case, mode):
    """(metric, keyword arguments) for each way of calling a sweep."""
    return {
        "scalar": (case.scalar, {}),
        "mean": (case.per_example, {"reduce": "mean"}),
        "scalar_baseline": (case.scalar, {"baseline": True}),
        "none_baseline_mapping": (case.metrics, {"reduce": "none", "baseline": True}),
        "mapping_mean": (case.metrics, {"reduce": "mean"}),
    }[mode]


def _has_hook(case, sweep_name):
    return not (sweep_name.endswith("resid_mid") and "blocks.0.hook_resid_mid" not in case.clean_cache)


@pytest.mark.parametrize("mode", ["scalar", "mean", "scalar_baseline", "none_baseline_mapping", "mapping_mean"])
@pytest.mark.parametrize("sweep_name", SWEEPS)
def test_sweep_matches_transformer_lens(zoo_case, sweep_name, mode):
    case = zoo_case
    if not _has_hook(case, sweep_name):
        pytest.skip("parallel attention+MLP blocks have no resid_mid (TransformerLens refuses too)")
    metric, kwargs = _mode_args(case, mode)
    ref = getattr(tl, sweep_name)(case.model, case.corrupted, case.clean_cache, metric, **kwargs)
    for ours in _ours(getattr(fp, sweep_name), case.model, case.corrupted, case.clean_cache, metric, **kwargs).values():
        assert_results_equal(ours, ref)
    assert_varies(ref if isinstance(ref, torch.Tensor) else ref.values, sweep_name)


@pytest.mark.parametrize("mode", ["scalar", "none_baseline_mapping", "scalar_baseline"])
@pytest.mark.parametrize("helper", EVERY)
def test_every_helper_matches_transformer_lens(zoo_case, helper, mode):
    case = zoo_case
    metric, kwargs = _mode_args(case, mode)
    ref = getattr(tl, helper)(case.model, case.corrupted, case.clean_cache, metric, **kwargs)
    for ours in _ours(getattr(fp, helper), case.model, case.corrupted, case.clean_cache, metric, **kwargs).values():
        assert_results_equal(ours, ref)
    if case.model.cfg.n_key_value_heads not in (None, case.model.cfg.n_heads) and helper != "get_act_patch_block_every":
        values = ours if isinstance(ours, torch.Tensor) else ours.values
        kv = case.model.cfg.n_key_value_heads
        assert bool((values[2:4, ..., kv:] == 0).all()), "GQA k/v sweeps must be zero-padded to n_heads"


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
def test_index_df_mode_matches_transformer_lens(zoo_case, activation, setter, columns, mode):
    case = zoo_case
    cfg, n_pos = case.model.cfg, case.corrupted.shape[1]
    limits = {"layer": cfg.n_layers, "pos": n_pos, "head": cfg.n_heads, "head_index": cfg.n_heads, "dest_pos": n_pos, "src_pos": n_pos}
    g = torch.Generator().manual_seed(7)
    index_df = pd.DataFrame({c: torch.randint(0, limits[c], (13,), generator=g).tolist() for c in columns})
    if mode == "return_index_df":
        metric, kwargs = case.scalar, {"return_index_df": True}
    else:
        metric, kwargs = _mode_args(case, mode)
    args = (case.model, case.corrupted, case.clean_cache, metric, setter, activation)
    ref = tl.generic_activation_patch(*args, index_df=index_df, **kwargs)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("helper", ["get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every"])
def test_results_do_not_depend_on_chunk_size(zoo_case, helper, backend):
    case = zoo_case
    args = (case.model, case.corrupted, case.clean_cache, case.metrics)
    run = partial(getattr(fp, helper), *args, reduce="none", progress=False, backend=backend)
    one_per_chunk, all_in_one, tiny_budget = run(chunk_size=1), run(chunk_size=10**6), run(memory_budget=1)
    assert_varies(all_in_one.values)
    assert_close(one_per_chunk.values, all_in_one.values)
    assert_close(tiny_budget.values, all_in_one.values)
    ref = getattr(tl, helper)(*args, reduce="none")
    assert_results_equal(all_in_one, ref)


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
