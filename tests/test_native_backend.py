"""The native backend's own guarantees: parity refusal, fallback, compute skipping, metric reads."""

import warnings

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

from fastpatch import patching as fp
from fastpatch.engine.native import NativeModel, ParityError, UnsupportedModel
from fastpatch.engine.native.backend import group_cells
from fastpatch.engine.plan import Sweep, cell_locations
from fastpatch.engine.probing import clean_activations_for
from fastpatch.metrics import LogitDiff, LogProb, NormalizedEffect


@pytest.fixture()
def doctored_case():
    """A GPT-2 whose second MLP's output is doubled by a torch hook: a feature that no standard
    weight shows, so only the parity check can notice that the native forward lacks it."""
    case = zoo.Case.build("gpt2")
    mlp = case.model.blocks[1].mlp
    handle = mlp.register_forward_hook(lambda module, args, output: output * 2)
    with torch.no_grad():
        _, case.clean_cache = case.model.run_with_cache(case.clean)
    yield case
    handle.remove()


def test_parity_check_catches_a_feature_the_native_forward_lacks(doctored_case):
    case = doctored_case
    args = (case.model, case.corrupted, case.clean_cache, case.scalar)
    with pytest.raises(ParityError, match="disagrees with the model"):
        fp.get_act_patch_attn_head_out_all_pos(*args, progress=False, backend="native")
    # the warning names the earliest hook in forward order that disagrees (not the logits), once per model
    with pytest.warns(UserWarning, match=r"native backend unsupported for GPT2LMHeadModel: native forward disagrees "
                      r"with the model at blocks\.(1\.hook_mlp_out|2\.hook_resid_pre):.*using hooks, expect about "
                      "TransformerLens speed"):
        ours = fp.get_act_patch_attn_head_out_all_pos(*args, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.get_act_patch_attn_head_out_all_pos(*args, progress=False)
    ref = tl.get_act_patch_attn_head_out_all_pos(*args)
    assert_close(ours, ref)
    assert_varies(ref)


def _per_tensor_parity(native, logits, cache, trace):
    """The parity check as it was written first (one host read per tensor): the reference for its
    one-transfer form. Returns the error message it raises, or ``None``."""
    rtol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 5e-2
    checks = {n: (v, logits if n == "logits" else cache[n])
              for n, v in trace.hook_values(native.parallel).items() if n in cache or n == "logits"}
    for name, (ours, theirs) in checks.items():
        if ours.shape != theirs.shape:
            return f"native forward's {name} has shape {tuple(ours.shape)}, the model's {tuple(theirs.shape)}"
        scale = float(theirs.abs().max()) + 1e-6
        err = float((ours.float() - theirs.float()).abs().max())
        if not err <= rtol * scale:
            return (f"native forward disagrees with the model at {name}: max abs error {err:.3g} "
                    f"(scale {scale:.3g}); the model has a feature the native backend does not implement")
    return None


@pytest.mark.parametrize("name", ["gpt2", "neox"])
def test_parity_check_names_the_earliest_disagreeing_hook_with_one_read_back(name):
    """The parity check reads every tensor's error back at once, yet still reports the first tensor
    (in check order) that disagrees, with the per-tensor check's exact message; a shape mismatch
    is reported only when no earlier tensor disagrees in value."""
    from torch.utils._python_dispatch import TorchDispatchMode

    case = zoo.Case.build(name)
    native = NativeModel(case.model)
    with torch.no_grad():
        logits, cache = case.model.run_with_cache(case.corrupted)
        if native.positions == "rotary":
            native.rotary = []
            for l in range(native.n_layers):
                cos, sin = cache[f"blocks.{l}.attn.hook_cos"], cache[f"blocks.{l}.attn.hook_sin"]
                native.rotary.append((cos.reshape(-1, *cos.shape[-2:])[0], sin.reshape(-1, *sin.shape[-2:])[0]))
        trace = native.trace(case.corrupted)

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func.overloadpacket.__name__ == "_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    with Reads():
        native.check_parity(logits, cache, trace)  # agrees: no error, no scalar read per tensor
    assert Reads.count == 0 and _per_tensor_parity(native, logits, cache, trace) is None

    def expect(doctored_trace, where):
        message = _per_tensor_parity(native, logits, cache, doctored_trace)
        assert message is not None and where in message
        with pytest.raises(ParityError) as raised:
            native.check_parity(logits, cache, doctored_trace)
        assert str(raised.value) == message

    # Values off at block 1's z and (later in check order) block 2's MLP: block 1's z is named.
    trace.z[1] = trace.z[1] + 1.0
    trace.mlp_out[2] = trace.mlp_out[2] * 3
    expect(trace, "at blocks.1.attn.hook_z:")
    # A shape mismatch after the first value error does not mask it; before it, it is reported.
    trace.attn_out[2] = trace.attn_out[2][:, :-1]
    expect(trace, "at blocks.1.attn.hook_z:")
    trace.resid_pre[0] = trace.resid_pre[0][:1]
    expect(trace, "native forward's blocks.0.hook_resid_pre has shape")
    # A NaN anywhere still fails the check.
    trace.resid_pre[0] = cache["blocks.0.hook_resid_pre"].clone()
    trace.z[1] = cache["blocks.1.attn.hook_z"].clone()
    trace.attn_out[2] = cache["blocks.2.hook_attn_out"].clone()
    trace.mlp_out[2] = cache["blocks.2.hook_mlp_out"].clone()
    trace.v[2] = trace.v[2].clone()
    trace.v[2][0, 0, 0, 0] = float("nan")
    expect(trace, "at blocks.2.attn.hook_v:")


def test_causal_mask_is_built_once_and_sliced():
    """``future_mask`` equals the mask built from positions, for every query window, and one
    model's calls share one tensor per number of keys (row slices of it)."""
    native = NativeModel(zoo.Case.build("gpt2").model)
    for nk in (1, 4, 7):
        for q_start in range(nk + 2):
            for nq in range(1, nk + 3):
                expected = torch.arange(nk)[None, :] > torch.arange(q_start, q_start + nq)[:, None]
                assert torch.equal(native.future_mask(nq, nk, q_start, torch.device("cpu")), expected)
    a = native.future_mask(3, 7, 4, torch.device("cpu"))
    b = native.future_mask(7, 7, 0, torch.device("cpu"))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_probe_shapes_from_the_parity_run_match_the_probe_forward(zoo_case):
    """On the native backend the parity run's cache stands in for the hook probe: same shapes."""
    from fastpatch.engine.probing import probe_hooks

    case = zoo_case
    native, trace = NativeModel.checked(case.model, case.corrupted)
    names = [n for n in case.model.hook_dict if n in trace.hook_shapes]
    assert "blocks.0.hook_resid_pre" in names and "blocks.1.attn.hook_pattern" in names
    assert probe_hooks(case.model, case.corrupted, names) == {n: trace.hook_shapes[n] for n in names}


def test_unsupported_config_is_refused_or_falls_back():
    case = zoo.Case.build("gpt2")
    case.model.cfg.scale_attn_by_inverse_layer_idx = True  # the bridge ignores it; the native forward refuses it
    args = (case.model, case.corrupted, case.clean_cache, case.scalar)
    try:
        with pytest.raises(UnsupportedModel, match="scale_attn_by_inverse_layer_idx"):
            fp.get_act_patch_resid_pre(*args, progress=False, backend="native")
        with pytest.warns(UserWarning, match="scale_attn_by_inverse_layer_idx=True; using hooks, expect about TransformerLens speed"):
            ours = fp.get_act_patch_resid_pre(*args, progress=False)  # falls back with the reason: same numbers
        assert_close(ours, tl.get_act_patch_resid_pre(*args))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model
            fp.get_act_patch_resid_pre(*args, progress=False)
    finally:
        case.model.cfg.scale_attn_by_inverse_layer_idx = False


def test_bad_backend_name():
    case = zoo.Case.build("gpt2")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, case.scalar, backend="fast")


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_cells_before_the_first_corrupted_position_are_skipped(name):
    """Clean and corrupted prompts agree before position 2: by-position patches there are no-ops,
    all-position head patches start at position 2, and by-position patches at their own position."""
    case = zoo.Case.build(name, first_diff=2)
    native, trace = NativeModel.checked(case.model, case.corrupted)
    sweeps = [
        Sweep("resid_pre", fp.layer_pos_patch_setter, fp.make_df_from_ranges([3, 5], ["layer", "pos"])),
        Sweep("z", fp.layer_head_vector_patch_setter, fp.make_df_from_ranges([3, 2], ["layer", "head"])),
    ]
    locations = cell_locations(sweeps)
    clean = clean_activations_for(case.model, case.corrupted, case.clean_cache, sweeps)
    groups, no_ops = group_cells(native, trace, sweeps, locations, clean)
    resid_cells = {c: sweeps[0].indices[r] for c, (s, r) in enumerate(locations) if s == 0}
    assert sorted(no_ops) == sorted(c for c, idx in resid_cells.items() if idx[1] < 2)
    for start, cells in groups.items():
        for cell, layer, stage in cells:
            s, r = locations[cell]
            expected = sweeps[0].indices[r][1] if s == 0 else 2
            assert start == expected


@pytest.mark.slow  # TransformerLens's loop over every head, position and activation of four models
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_metrics_that_read_a_few_logits_match_full_logits(name):
    case = zoo.Case.build(name)
    answer, wrong = case.clean[:, -1], case.corrupted[:, -1]
    with torch.no_grad():
        clean_logits = case.model(case.clean)
        corrupted_logits = case.model(case.corrupted)
    metrics = {
        "logit_diff": LogitDiff(answer, wrong, per_prompt=True),
        "logprob": LogProb(answer, per_prompt=True),
        "normalized": NormalizedEffect.from_logits(LogitDiff(answer, wrong, per_prompt=True), clean_logits, corrupted_logits),
    }
    plain = {k: (lambda logits, m=m: m(logits)) for k, m in metrics.items()}  # hides the reads
    args = (case.model, case.corrupted, case.clean_cache)
    reads = fp.get_act_patch_attn_head_by_pos_every(*args, metrics, reduce="none", progress=False, backend="native")
    full = fp.get_act_patch_attn_head_by_pos_every(*args, plain, reduce="none", progress=False, backend="native")
    ref = tl.get_act_patch_attn_head_by_pos_every(*args, metrics, reduce="none")
    assert_varies(ref.values)
    assert_close(reads.values, ref.values)
    assert_close(full.values, ref.values)


def test_metric_reading_an_early_position(zoo_case):
    """A metric that reads a position before a patch's first change gets the baseline there."""
    case = zoo_case
    metric = LogitDiff(case.clean[:, 3], case.corrupted[:, 3], position=3)
    args = (case.model, case.corrupted, case.clean_cache, metric)
    ref = tl.get_act_patch_resid_pre(*args)
    ours = fp.get_act_patch_resid_pre(*args, progress=False, backend="native")
    assert_close(ours, ref)
    assert_varies(ref)
