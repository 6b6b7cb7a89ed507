"""The public API: what fastpatch exports, and that it mirrors transformer_lens.patching 4.3."""

import inspect

from transformer_lens import patching as tl

import fastpatch
from fastpatch import patching as fp


def test_top_level_exports():
    assert sorted(fastpatch.__all__) == sorted(
        ["patching", "attribution", "metrics", "PatchingResult", "hook_count", "model_flags", "last_run_stats", "__version__"]
    )
    assert fastpatch.PatchingResult is tl.PatchingResult


def test_every_transformer_lens_sweep_is_mirrored():
    names = [n for n in dir(tl) if n.startswith("get_act_patch_") and "direct_path" not in n]
    assert len(names) == 18  # 15 sweeps + 3 *_every helpers
    for name in names:
        assert name in fp.__all__, name
        ours, theirs = getattr(fp, name), getattr(tl, name)
        if hasattr(theirs, "keywords"):  # a partial of generic_activation_patch: same bound arguments
            assert ours.keywords == theirs.keywords, name
            assert ours.__doc__ == theirs.__doc__
    for name in ("generic_activation_patch", "make_df_from_ranges", "PatchingResult") + tuple(
        n for n in dir(tl) if n.endswith("_patch_setter")
    ):
        assert name in fp.__all__, name


def test_generic_activation_patch_signature_extends_transformer_lens():
    ours = inspect.signature(fp.generic_activation_patch).parameters
    theirs = inspect.signature(tl.generic_activation_patch).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    assert list(ours)[: len(theirs)] == list(theirs)
    extra = [n for n in ours if n not in theirs]
    assert extra == ["chunk_size", "memory_budget", "progress", "backend", "distributed", "user_hooks"]
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)
