"""Several (activation, index) slices patched in one cell (``get_act_patch_together``), against a
TransformerLens loop: one forward per cell with one hook per slice, each applying TransformerLens's
own setter with the clean activation."""

import warnings

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl
from transformer_lens import utilities as tl_utils

from fastpatch import patching as fp

MODELS = ("gpt2", "neox", "llama")

# (activation, index, TransformerLens setter) per slice; each cell is patched in one forward
CELLS = [
    [("z", (0, 1), tl.layer_head_vector_patch_setter), ("z", (2, 0), tl.layer_head_vector_patch_setter)],
    [("z", (0, 1), tl.layer_head_vector_patch_setter)],
    [("z", (2, 0), tl.layer_head_vector_patch_setter)],
    [("resid_pre", (1, 3), tl.layer_pos_patch_setter), ("z", (0, 4, 2), tl.layer_pos_head_vector_patch_setter)],
    [("pattern", (1, 1, 4), tl.layer_head_pos_pattern_patch_setter), ("mlp_out", (0, 2), tl.layer_pos_patch_setter),
     ("v", (2, 1), tl.layer_head_vector_patch_setter)],
    [("z", (1, 0), tl.layer_head_vector_patch_setter), ("z", (1, 2), tl.layer_head_vector_patch_setter)],
]


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    return zoo.Case.build(request.param)


def _tl_loop(case, cells):
    """Per cell: one hooked forward with TransformerLens's setter at each slice (reduce='none')."""
    out = []
    for cell in cells:
        hooks = []
        for act, index, setter in cell:
            name = tl_utils.get_act_name(act, index[0])
            clean = case.clean_cache[name]
            hooks.append((name, lambda x, hook, setter=setter, index=index, clean=clean: setter(x.clone(), index, clean)))
        with torch.no_grad():
            out.append(case.per_example(case.model.run_with_hooks(case.corrupted, fwd_hooks=hooks)))
    return torch.stack(out)


def test_joint_cells_equal_a_transformer_lens_loop_with_several_hooks(case):
    ref = _tl_loop(case, CELLS)  # [cell, batch]
    assert_varies(ref.mean(-1), "joint cells")
    # the two heads together are not the sum of their single effects (else AND questions would be moot)
    base = case.per_example(case.model(case.corrupted)).detach()
    assert (ref[0] - base - (ref[1] - base) - (ref[2] - base)).abs().max() > 1e-3
    cells = [[(act, index) for act, index, _ in cell] for cell in CELLS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto falls back to hooks, saying why
        for backend in ("hooks", "auto"):
            ours = fp.get_act_patch_together(case.model, case.corrupted, case.clean_cache, case.per_example, cells,
                                             reduce="none", backend=backend, progress=False, chunk_size=4)
            assert_close(ours.values, ref)
    # a caller's own setter, called per cell, and the scalar return
    mine = [[("z", (0, 1), tl.layer_head_vector_patch_setter), ("resid_pre", (2, 4), tl.layer_pos_patch_setter)]]
    own = [[(act, index, lambda a, i, c, s=setter: s(a, i, c)) for act, index, setter in cell] for cell in mine]
    assert_close(fp.get_act_patch_together(case.model, case.corrupted, case.clean_cache, case.scalar, own,
                                           backend="hooks", progress=False), _tl_loop(case, mine).mean(-1))


def test_bad_joint_cells_are_refused(case):
    args = (case.model, case.corrupted, case.clean_cache, case.scalar)
    kw = dict(backend="hooks", progress=False)
    with pytest.raises(ValueError, match="no TransformerLens setter patches 'z' with an index of 4 entries"):
        fp.get_act_patch_together(*args, [[("z", (0, 1, 2, 3))]], **kw)
    with pytest.raises(ValueError, match="patches of 'z': index_df column 'head' is out of range"):
        fp.get_act_patch_together(*args, [[("z", (0, 1)), ("z", (1, 99))]], **kw)
    with pytest.raises(ValueError, match="cell 1 must be a non-empty list"):
        fp.get_act_patch_together(*args, [[("z", (0, 1))], []], **kw)
    with pytest.raises(ValueError, match="patches one slice per cell|several slices at once"):
        fp.get_act_patch_together(*args, [[("z", (0, 1))]], backend="native", progress=False)


def test_no_state_left_when_the_metric_raises_mid_sweep(case):
    """A metric that fails on the second chunk leaves no hook and no flag changed on the model."""
    from fastpatch import hook_count, model_flags

    flags, calls = model_flags(case.model), []

    def failing(logits):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("metric failed")
        return case.scalar(logits)

    cells = [[(act, index) for act, index, _ in cell] for cell in CELLS]
    with pytest.raises(RuntimeError, match="metric failed"):
        fp.get_act_patch_together(case.model, case.corrupted, case.clean_cache, failing, cells,
                                  backend="hooks", progress=False, chunk_size=1)
    assert model_flags(case.model) == flags and hook_count(case.model) == 0
