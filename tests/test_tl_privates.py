"""Pins every TransformerLens private that fastpatch relies on (``fastpatch/_tl_private.py``).

Each test names one private and checks the part of its behaviour fastpatch uses, so a
TransformerLens release that moves or changes one fails here, by name, before any oracle test
fails for a less obvious reason. ``pyproject.toml`` pins TransformerLens to the releases these
tests cover.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import zoo
from transformer_lens.patching import PatchingResult

from fastpatch import _tl_private as tlp

# (module, name) of every private fastpatch imports; _tl_private re-exports each one.
PRIVATES = [
    ("transformer_lens.patching", "_wrap_tensor_result"),
    ("transformer_lens.patching", "_stack_patch_types"),
    ("transformer_lens.patching", "_HEAD_TYPES"),
    ("transformer_lens.patching", "_BLOCK_TYPES"),
    ("transformer_lens.patching", "_check_direct_path_support"),
    ("transformer_lens.patching", "_split_qkv_input"),
    ("transformer_lens.model_bridge.sources._bridge_builder", "build_bridge_from_module"),
]


@pytest.mark.parametrize("module, name", PRIVATES, ids=[n for _, n in PRIVATES])
def test_private_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"TransformerLens no longer has {module}.{name}"


@pytest.mark.parametrize(
    "name, params",
    [
        ("wrap_tensor_result", ["tensor", "axis_names"]),
        ("stack_patch_types", ["results", "axis_order", "n_heads", "type_names"]),
        ("check_direct_path_support", ["model", "src_layers", "component"]),
        ("split_qkv_input", ["model"]),
    ],
)
def test_private_signature(name, params):
    assert list(inspect.signature(getattr(tlp, name)).parameters) == params, f"{name} changed its signature"


def test_build_bridge_from_module_signature():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    params = inspect.signature(build_bridge_from_module).parameters
    assert list(params)[:2] == ["model", "architecture"] and "hf_config" in params


def test_patch_type_names():
    assert tuple(tlp.HEAD_TYPES) == ("out", "q", "k", "v", "pattern")
    assert tuple(tlp.BLOCK_TYPES) == ("resid_pre", "attn_out", "mlp_out")


def test_wrap_tensor_result():
    values = torch.arange(6.0).reshape(2, 3)
    out = tlp.wrap_tensor_result(values, ["layer", "head"])
    assert isinstance(out, PatchingResult)
    assert torch.equal(out.values, values)
    assert list(out.axis_names) == ["layer", "head"] and list(out.metric_names) == ["metric"]
    assert out.reduced and len(out.index_df) == 6 and list(out.index_df.columns) == ["layer", "head"]


def test_stack_patch_types_stacks_tensors_and_pads_results():
    a, b = torch.ones(2, 4), torch.zeros(2, 4)
    assert torch.equal(tlp.stack_patch_types([a, b], axis_order=("layer", "head"), n_heads=4, type_names=("x", "y")),
                       torch.stack([a, b]))
    full = tlp.wrap_tensor_result(torch.ones(2, 4), ["layer", "head"])
    grouped = tlp.wrap_tensor_result(torch.full((2, 2), 2.0), ["layer", "head"])  # 2 K/V heads of 4
    out = tlp.stack_patch_types([full, grouped], axis_order=("layer", "head"), n_heads=4, type_names=("out", "k"))
    assert isinstance(out, PatchingResult) and out.values.shape == (2, 2, 4)
    assert torch.equal(out.values[1, :, :2], torch.full((2, 2), 2.0)) and not out.values[1, :, 2:].any()
    assert list(out.axis_names) == ["patch_type", "layer", "head"] and list(out.patch_type_names) == ["out", "k"]


def test_check_direct_path_support():
    tlp.check_direct_path_support(zoo.gpt2(), [0], "q")  # supported: returns quietly
    tlp.check_direct_path_support(zoo.llama(), [0], "q")
    with pytest.raises(ValueError):  # K/V paths into grouped-query heads are refused
        tlp.check_direct_path_support(zoo.llama(), [0], "k")


def test_split_qkv_input_forks_the_qkv_inputs_and_restores_the_flag():
    model = zoo.gpt2()
    before = bool(model.cfg.use_split_qkv_input)
    fired = []
    with tlp.split_qkv_input(model):
        assert model.cfg.use_split_qkv_input
        with torch.no_grad():
            model.run_with_hooks(
                torch.zeros(1, 3, dtype=torch.long),
                fwd_hooks=[("blocks.1.attn.hook_q_input", lambda act, hook: fired.append(tuple(act.shape)))],
            )
    assert fired == [(1, 3, model.cfg.n_heads, model.cfg.d_model)]  # [batch, pos, n_heads, d_model]
    assert bool(model.cfg.use_split_qkv_input) == before


def _imports(path):
    """(module, name) of every ``from module import name`` and (module, None) of every ``import module``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield from ((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)


def _tl_private_uses(path):
    """TransformerLens privates a file imports (``from transformer_lens.x import _y``, a private module
    path) or reaches through an imported module (``from transformer_lens import patching as tl; tl._y``)."""
    tree = ast.parse(path.read_text())
    tl_aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformer_lens"):
            for alias in node.names:
                if alias.name.startswith("_") or any(p.startswith("_") for p in node.module.split(".")):
                    yield f"{node.module}.{alias.name}"
                tl_aliases.add(alias.asname or alias.name)  # a submodule or a name: its attributes count too
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("transformer_lens"):
                    if any(p.startswith("_") for p in alias.name.split(".")):
                        yield alias.name
                    tl_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in tl_aliases:
                yield f"{node.value.id}.{node.attr}"


def test_only_tl_private_imports_transformer_lens_privates():
    package = Path(tlp.__file__).parent
    offenders = [
        f"{path.relative_to(package)}: {use}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_tl_private.py"
        for use in _tl_private_uses(path)
    ]
    assert not offenders, f"import TransformerLens privates from fastpatch._tl_private: {offenders}"


def test_engine_imports_no_api_module():
    """The engine sits below the API: it never imports fastpatch.patching, .attribution or .metrics."""
    engine = Path(tlp.__file__).parent / "engine"
    api = ("fastpatch.patching", "fastpatch.attribution", "fastpatch.metrics")
    offenders = [
        f"{path.relative_to(engine)}: {module}"
        for path in sorted(engine.rglob("*.py"))
        for module, name in _imports(path)
        if module.startswith(api) or (module == "fastpatch" and name in ("patching", "attribution", "metrics"))
    ]
    assert not offenders, offenders
