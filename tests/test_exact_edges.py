"""Exact edges (fastpatch.circuits.exact_edges), grouped-query readers and per-position edges.

References, written here from the definitions and sharing no code with fastpatch:

- the plain loop: one hooked forward per edge. The writer's write (``hook_embed``, head
  ``z[:, :, h] @ W_O[h]``, ``hook_mlp_out``; clean minus corrupted) is added to the reader's input
  alone: for a Q/K/V reader, head ``h``'s (K/V head ``g``'s on grouped-query models) projection is
  recomputed from the block's own ``ln1`` at ``resid_pre + write`` and set at ``hook_q/k/v``; for
  an MLP reader it is added at ``ln2.hook_in``; for the logits at ``ln_final.hook_in``;
- TransformerLens's own ``get_act_patch_direct_path_all_sources`` for head -> Q/K/V edges where it
  runs (GPT-2);
- for edge attribution on the grouped-query model, reader gradients at TransformerLens's split
  ``hook_{q,k,v}_input`` fork (one copy per K/V head there), contracted with the writes.

fp32 tolerance 1e-5 of the values' scale (tests/helpers.py).
"""

from __future__ import annotations

import re

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies
from transformer_lens import patching as tl

from fastpatch import hook_count, model_flags
from fastpatch import patching as fp
from fastpatch._tl_private import split_qkv_input
from fastpatch.attribution import get_attr_patch_edges
from fastpatch.circuits import exact_edges
from fastpatch.sources import mean_ablation, zero_ablation

MODELS = ["gpt2", "neox", "llama"]
BACKENDS = ("native", "hooks")
FIRST_DIFF = 2


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    case = zoo.Case.build(request.param, batch=3, n_pos=5, first_diff=FIRST_DIFF)
    with torch.no_grad():
        _, case.corrupted_cache = case.model.run_with_cache(case.corrupted)
    return case


# ---- the plain loop -------------------------------------------------------------------------------
def _parse_writer(name):
    if name == "embed":
        return "embed", -1, 0
    if name.startswith("MLP"):
        return "mlp", int(name[3:]), 0
    layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", name).groups())
    return "head", layer, head


def _parse_reader(name, n_layers):
    if name == "logits":
        return "logits", n_layers, 0
    if name.endswith(".in"):
        return "mlp_in", int(name[3:-3]), 0
    layer, _, head, component = re.fullmatch(r"L(\d+)(H|KV)(\d+)\.([qkv])", name).groups()
    return component, int(layer), int(head)


def _write(model, src_cache, base_cache, writer, pos=None):
    kind, layer, head = writer
    if kind == "embed":
        delta = src_cache["hook_embed"] - base_cache["hook_embed"]
    elif kind == "mlp":
        delta = src_cache[f"blocks.{layer}.hook_mlp_out"] - base_cache[f"blocks.{layer}.hook_mlp_out"]
    else:
        W_O, name = model.blocks[layer].attn.W_O[head].detach(), f"blocks.{layer}.attn.hook_z"
        delta = src_cache[name][:, :, head] @ W_O - base_cache[name][:, :, head] @ W_O
    if pos is not None:
        only = torch.zeros_like(delta)
        only[:, pos] = delta[:, pos]
        delta = only
    return delta


def _reader_hook(model, base_cache, reader, delta):
    component, layer, head = reader
    if component == "logits":
        return "ln_final.hook_in", lambda act, hook: act + delta
    if component == "mlp_in":
        return f"blocks.{layer}.ln2.hook_in", lambda act, hook: act + delta
    attn = model.blocks[layer].attn
    W, b = getattr(attn, f"W_{component.upper()}")[head], getattr(attn, f"b_{component.upper()}", None)
    with torch.no_grad():
        value = model.blocks[layer].ln1(base_cache[f"blocks.{layer}.hook_resid_pre"] + delta) @ W
    value = value if b is None else value + b[head]

    def set_head(act, hook):
        act = act.clone()
        act[:, :, head] = value
        return act

    return f"blocks.{layer}.attn.hook_{component}", set_head


def plain_loop(model, base_tokens, src_cache, base_cache, metric, edges, cells):
    """``{(w, r, pos): metric}`` by one hooked forward per cell (``pos=None``: the whole write)."""
    L = model.cfg.n_layers
    out = {}
    for w, r, pos in cells:
        delta = _write(model, src_cache, base_cache, _parse_writer(edges.writer_names[w]), pos)
        hook = _reader_hook(model, base_cache, _parse_reader(edges.reader_names[r], L), delta)
        with torch.no_grad():
            out[(w, r, pos)] = float(metric(model.run_with_hooks(base_tokens, fwd_hooks=[hook])))
    return out


def _expected_valid(edges, cfg):
    """The reader comes after the writer (a head feeds its own block's MLP on sequential blocks)."""
    valid = torch.zeros(len(edges.writer_names), len(edges.reader_names), dtype=torch.bool)
    for i, w in enumerate(edges.writer_names):
        kind, wl, _ = _parse_writer(w)
        for j, r in enumerate(edges.reader_names):
            component, rl, _ = _parse_reader(r, cfg.n_layers)
            own_mlp = kind == "head" and component == "mlp_in" and rl == wl and not cfg.parallel_attn_mlp
            valid[i, j] = kind == "embed" or rl > wl or own_mlp
    return valid


@pytest.fixture(scope="module")
def exact(case):
    return exact_edges(case.model, case.clean, case.corrupted, case.scalar, backend="native")


def sample(valid, stride):
    """Every ``stride``-th valid edge, writer-major (a stride prime to the reader count walks through
    every reader kind and every writer kind): the plain loop's share of the suite's time."""
    return [(w, r) for w, r in torch.nonzero(valid).tolist()][::stride]


@pytest.fixture(scope="module")
def loop(case, exact):
    """The plain loop's change from the baseline on a third of the valid edges: ``{(w, r): value}``."""
    cells = [(w, r, None) for w, r in sample(exact.valid, 3)]
    values = plain_loop(case.model, case.corrupted, case.clean_cache, case.corrupted_cache, case.scalar, exact, cells)
    with torch.no_grad():
        baseline = float(case.scalar(case.model(case.corrupted)))
    return {(w, r): value - baseline for (w, r, _), value in values.items()}, baseline


# ---- 1. exact edges = the plain loop, both backends -------------------------------------------------
def test_exact_edges_match_plain_loop(case, exact, loop):
    values, baseline = loop
    cfg = case.model.cfg
    assert torch.equal(exact.valid.cpu(), _expected_valid(exact, cfg))
    ref = torch.tensor(list(values.values()))
    assert_varies(ref, "plain-loop edge effects")
    assert {exact.reader_names[r].split(".")[-1] for w, r in values} == {"q", "k", "v", "in", "logits"}
    assert abs(exact.baseline - baseline) <= 1e-5 * abs(baseline)
    assert_close(torch.stack([exact.scores[c] for c in values]).cpu(), ref)
    # the hooks backend (every edge a hooked row block) on every edge
    hooks = exact_edges(case.model, case.clean, case.corrupted, case.scalar, backend="hooks")
    assert_varies(exact.scores[exact.valid])
    assert_close(hooks.scores, exact.scores)
    kv = cfg.n_key_value_heads or cfg.n_heads
    assert len(exact.reader_names) == cfg.n_layers * (cfg.n_heads + 2 * kv + 1) + 1


def test_same_layout_as_edge_attribution(case, exact):
    attr = get_attr_patch_edges(case.model, case.clean, case.corrupted, case.scalar)
    assert attr.writer_names == exact.writer_names and attr.reader_names == exact.reader_names
    assert torch.equal(attr.valid.cpu(), exact.valid.cpu())
    top = exact.top_edges(4)
    assert list(top.columns) == ["writer", "reader", "score"]
    assert abs(abs(top.score[0]) - float(exact.scores.abs().max())) < 1e-12
    assert len(exact.to_frame()) == int(exact.valid.sum())


# ---- 2. TransformerLens's direct path patching ------------------------------------------------------
def test_head_edges_match_transformer_lens_direct_paths(case, exact):
    if case.name != "gpt2":
        pytest.skip("TransformerLens's Q/K/V fork (and K/V on grouped-query models) is checked on GPT-2")
    L, H = case.model.cfg.n_layers, case.model.cfg.n_heads
    W = {n: i for i, n in enumerate(exact.writer_names)}
    R = {n: i for i, n in enumerate(exact.reader_names)}
    args = (case.model, case.corrupted, case.clean_cache, case.corrupted_cache, case.scalar)
    refs, ours = [], []
    for component in ("q", "k", "v"):
        for sl, sh in ((0, 1), (1, 2)):
            refs.append(tl.get_act_patch_direct_path(*args, sl, sh, component, verbose=False))
            ours.append(torch.zeros_like(refs[-1]))
            for dl, dh in [(dl, dh) for dl in range(sl + 1, L) for dh in range(H)]:
                ours[-1][dl, dh] = exact.scores[W[f"L{sl}H{sh}"], R[f"L{dl}H{dh}.{component}"]] + exact.baseline
    assert_varies(torch.stack(refs)[:, 1:])
    assert_close(torch.stack(ours), torch.stack(refs))


# ---- 3. grouped-query attention -------------------------------------------------------------------
def test_grouped_kv_direct_paths_match_plain_loop(case, exact, loop):
    """Direct path patching into K/V heads (TransformerLens refuses): ``[sl, sh, dl, kv_head]``."""
    cfg = case.model.cfg
    if not cfg.n_key_value_heads or cfg.n_key_value_heads == cfg.n_heads:
        pytest.skip("no grouped K/V heads")
    values, baseline = loop  # the plain loop on a sample of edges; exact edges carry the rest
    W = {n: i for i, n in enumerate(exact.writer_names)}
    R = {n: i for i, n in enumerate(exact.reader_names)}
    L, H, KV = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads
    args = (case.model, case.corrupted, case.clean_cache, case.corrupted_cache, case.scalar)
    checked = 0
    for component in ("k", "v"):
        paths = [(sl, sh, dl, g) for sl in range(L) for sh in range(H) for dl in range(sl + 1, L) for g in range(KV)]
        ref = torch.zeros(L, H, L, KV)
        for sl, sh, dl, g in paths:
            edge = (W[f"L{sl}H{sh}"], R[f"L{dl}KV{g}.{component}"])
            ref[sl, sh, dl, g] = exact.scores[edge] + exact.baseline
            if edge in values:
                assert abs(values[edge] + baseline - ref[sl, sh, dl, g]) <= 1e-5 * float(ref.abs().max() + 1)
                checked += 1
        assert_varies(ref[:, :, 1:])
        for backend in BACKENDS:
            ours = fp.get_act_patch_direct_path_all_sources(*args, component, verbose=False, backend=backend)
            assert_close(ours, ref)
        one = fp.get_act_patch_direct_path(*args, 0, 1, component, verbose=False)
        assert one.shape == (L, KV)
        assert_close(one, ref[0, 1])
    assert checked >= 8, "the plain loop's sample must reach the K/V-head paths"


def _fork_gradients(model, tokens, metric):
    """d metric / d every reader's input: split Q/K/V fork copies, ln2 inputs, the final residual."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_{c}_input" for l in range(L) for c in "qkv"]
    names += [f"blocks.{l}.ln2.hook_in" for l in range(L)] + ["ln_final.hook_in"]
    probes = {}

    def probe(name):
        def hook(act, hook):
            probes[name] = torch.zeros_like(act, requires_grad=True)
            return act + probes[name]

        return hook

    with split_qkv_input(model), torch.enable_grad():
        value = metric(model.run_with_hooks(tokens, fwd_hooks=[(n, probe(n)) for n in names]))
        grads = torch.autograd.grad(value, [probes[n] for n in names])
    return dict(zip(names, grads))


def test_grouped_kv_edge_attribution_matches_fork_gradients():
    """Edge attribution on the grouped-query model: each reader's score is the writes contracted
    with the gradient at TransformerLens's split fork (one input per K/V head); per-position
    scores sum to it; a reader's incoming scores sum to its own input change times its gradient."""
    case = zoo.Case.build("llama", batch=3, n_pos=5, first_diff=FIRST_DIFF)
    model, cfg = case.model, case.model.cfg
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(case.corrupted)
    grads = _fork_gradients(model, case.corrupted, case.scalar)
    ours = get_attr_patch_edges(model, case.clean, case.corrupted, case.scalar)
    ref = torch.zeros_like(ours.scores)
    into = torch.zeros(len(ours.reader_names))  # reader node scores: its whole input change . gradient
    for j, name in enumerate(ours.reader_names):
        component, layer, head = _parse_reader(name, cfg.n_layers)
        if component == "logits":
            grad, x = grads["ln_final.hook_in"], f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        elif component == "mlp_in":
            grad, x = grads[f"blocks.{layer}.ln2.hook_in"], f"blocks.{layer}.hook_resid_mid"
        else:
            grad, x = grads[f"blocks.{layer}.attn.hook_{component}_input"][:, :, head], f"blocks.{layer}.hook_resid_pre"
        into[j] = ((case.clean_cache[x] - corrupted_cache[x]) * grad).sum()
        for i, writer in enumerate(ours.writer_names):
            if ours.valid[i, j]:
                ref[i, j] = (_write(model, case.clean_cache, corrupted_cache, _parse_writer(writer)) * grad).sum()
    assert any("KV" in n for n in ours.reader_names)
    assert_varies(ref[ours.valid])
    assert_close(ours.scores, ref)
    assert_close(ours.scores.sum(0), into)
    by_pos = get_attr_patch_edges(model, case.clean, case.corrupted, case.scalar, per_position=True)
    assert by_pos.scores.shape == ours.scores.shape + (case.clean.shape[1],)
    assert_close(by_pos.scores.sum(-1), ours.scores)
    assert bool((by_pos.scores[:, :, :FIRST_DIFF] == 0).all()), "positions where the prompts agree have no edge"
    auto = get_attr_patch_edges(model, case.clean, case.corrupted, case.scalar, backend="autograd", per_position=True)
    assert_close(auto.scores, by_pos.scores)


# ---- 4. the noising direction and per-position edges ------------------------------------------------
def test_noising_direction_matches_plain_loop(case):
    if case.name != "llama":
        pytest.skip("one model: the direction only swaps the runs")
    ours = exact_edges(case.model, case.clean, case.corrupted, case.scalar, direction="noising")
    cells = [(w, r, None) for w, r in sample(ours.valid, 5)]
    values = plain_loop(case.model, case.clean, case.corrupted_cache, case.clean_cache, case.scalar, ours, cells)
    with torch.no_grad():
        baseline = float(case.scalar(case.model(case.clean)))
    ref = torch.tensor([values[c] - baseline for c in cells])
    assert_varies(ref)
    assert_close(torch.stack([ours.scores[w, r] for w, r, _ in cells]).cpu(), ref)
    with pytest.warns(FutureWarning, match="now spelled 'noising'"):  # the first release's spelling
        old = exact_edges(case.model, case.clean, case.corrupted, case.scalar, direction="noise")
    assert torch.equal(old.scores, ours.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablation_source_matches_plain_loop(case, backend):
    """A mean ablation (per position: values differ by position) patched into the corrupted run; on
    LLaMA also a zero ablation into the clean run (noising with a source)."""
    model = case.model
    runs = [("denoising", case.corrupted, case.corrupted_cache, mean_ablation(model, case.clean))]
    if case.name == "llama":
        runs.append(("noising", case.clean, case.clean_cache, zero_ablation(model, case.clean)))
    for direction, base, base_cache, source in runs:
        tokens = (None, base) if direction == "denoising" else (base, None)
        ours = exact_edges(model, *tokens, case.scalar, direction=direction, source=source, backend=backend)
        cells = [(w, r, None) for w, r in sample(ours.valid, 7)]
        values = plain_loop(model, base, source, base_cache, case.scalar, ours, cells)
        with torch.no_grad():
            baseline = float(case.scalar(model(base)))
        ref = torch.tensor([values[c] - baseline for c in cells])
        assert_varies(ref)
        assert_close(torch.stack([ours.scores[w, r] for w, r, _ in cells]).cpu(), ref)
        assert ours.baseline == pytest.approx(baseline, rel=1e-5, abs=1e-6)


def test_per_position_edges(case, exact):
    if case.name == "neox":
        pytest.skip("per-position edges are checked on GPT-2 (learned positions) and LLaMA (rotary, grouped K/V)")
    model, cfg = case.model, case.model.cfg
    by_pos = exact_edges(model, case.clean, case.corrupted, case.scalar, per_position=True)
    n_pos = case.clean.shape[1]
    assert by_pos.scores.shape == exact.scores.shape + (n_pos,)
    # the prompts agree before FIRST_DIFF: no write differs there, so those edges are exactly 0
    assert bool((by_pos.scores[:, :, :FIRST_DIFF] == 0).all())
    # a last-layer Q or MLP reader and the logits change only their own position's residual, and
    # the metric reads the last position: there the per-position edge is the whole edge, elsewhere 0
    own_position = rf"logits|L{cfg.n_layers - 1}H\d+\.q|MLP{cfg.n_layers - 1}\.in"
    last = [j for j, n in enumerate(exact.reader_names) if re.fullmatch(own_position, n)]
    assert_close(by_pos.scores[:, last, -1], exact.scores[:, last])
    assert float(by_pos.scores[:, last, :-1].abs().max()) <= 1e-5 * float(exact.scores.abs().max())  # 0 up to fp32
    # the plain loop on a sample of the edges, at the positions where the prompts differ
    cells = [(w, r, p) for i, (w, r) in enumerate(sample(exact.valid, 4)) for p in (FIRST_DIFF + i % (n_pos - FIRST_DIFF),)]
    values = plain_loop(model, case.corrupted, case.clean_cache, case.corrupted_cache, case.scalar, exact, cells)
    ref = torch.tensor([values[c] - exact.baseline for c in cells])
    assert_varies(ref)
    assert_close(torch.stack([by_pos.scores[c] for c in cells]).cpu(), ref)
    if case.name == "llama":  # the hooks backend runs every (edge, position) cell: one model
        hooks = exact_edges(model, case.clean, case.corrupted, case.scalar, per_position=True, backend="hooks")
        assert_close(hooks.scores, by_pos.scores)
    frame = by_pos.to_frame()
    assert list(frame.columns) == ["writer", "reader", "pos", "score"] and len(frame) == int(exact.valid.sum()) * n_pos


# ---- 5. arguments and model state -------------------------------------------------------------------
def test_bad_arguments_and_state():
    model = zoo.gpt2()
    clean, corrupted = zoo.prompt_pair()
    metric = lambda logits: logits[:, -1, 3].mean()  # noqa: E731
    with pytest.raises(ValueError, match="direction must be one of"):
        exact_edges(model, clean, corrupted, metric, direction="sideways")
    with pytest.raises(ValueError, match="same shape"):
        exact_edges(model, clean, corrupted[:, :-1], metric)
    with pytest.raises(ValueError, match="not both"):
        exact_edges(model, clean, corrupted, metric, source=zero_ablation(model, clean))
    with pytest.raises(ValueError, match="has no activation 'blocks.0.attn.hook_z'"):
        exact_edges(model, None, corrupted, metric, source=zero_ablation(model, clean, names_filter="hook_embed"))
    with pytest.raises(ValueError, match="per_position"):
        exact_edges(model, clean, corrupted, metric, per_position=1)
    with pytest.raises(ValueError, match="0-d|scalar"):
        exact_edges(model, clean, corrupted, lambda logits: logits[:, -1, 3])
    model.train()
    with pytest.raises(ValueError, match="evaluation mode"):
        exact_edges(model, clean, corrupted, metric)
    model.eval()
    flags = model_flags(model)
    calls = []

    def failing(logits):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("metric failed")
        return metric(logits)

    for backend in BACKENDS:
        calls.clear()
        with pytest.raises(RuntimeError, match="metric failed"):
            exact_edges(model, clean, corrupted, failing, backend=backend)
        assert model_flags(model) == flags and hook_count(model) == 0
