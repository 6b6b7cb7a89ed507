"""Batched circuit evaluation (fastpatch.circuits.evaluate) against a plain loop of hooked forwards.

The reference, written here from the definition (MIB / EAP-IG ``evaluate_graph``) and sharing no code
with fastpatch: one forward on the clean prompts per circuit. Hooks record every writer's output in
that forward (``hook_embed``, head ``z[:, :, h] @ W_O[h]``, ``hook_mlp_out``); each reader's input is
rewritten to its input minus, for every writer whose edge into it is not in the circuit, that output
minus the writer's ablated output: a Q/K/V reader by recomputing its head's projection from the
block's own ``ln1`` at ``resid_pre - lost`` and setting it at ``hook_q/k/v`` (K/V head ``g`` on the
grouped-query model), an MLP reader at ``ln2.hook_in``, the logits at ``ln_final.hook_in``. Ablated
outputs come from the corrupted run, zeros, the clean prompts' mean per position, or the clean
prompts permuted.

The empty circuit is checked against the ablated model itself (the corrupted run; a run with every
writer hook set to its ablated value), the full circuit against the clean run.
"""

from __future__ import annotations

import re

import pytest
import torch
import zoo
from helpers import assert_close, assert_varies

from fastpatch import hook_count, model_flags
from fastpatch.circuits import evaluate, full_circuit

MODELS = ["gpt2", "neox", "llama"]
ABLATIONS = ["corrupted", "zero", "mean", "resample"]
SEED = 3


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    case = zoo.Case.build(request.param, batch=3, n_pos=5, first_diff=2)
    model = case.model
    names = ["hook_embed"] + [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in ("attn.hook_z", "hook_mlp_out")]
    with torch.no_grad():
        _, corrupted = model.run_with_cache(case.corrupted, names_filter=lambda n: n in names)
        case.clean_logits = model(case.clean)
        case.corrupted_logits = model(case.corrupted)
    clean = case.clean_cache
    perm = torch.randperm(case.clean.shape[0], generator=torch.Generator().manual_seed(SEED))
    case.ablated_acts = {  # hook name -> [batch, pos, ...] ablated activation, per ablation
        "corrupted": {n: corrupted[n] for n in names},
        "zero": {n: torch.zeros_like(clean[n]) for n in names},
        "mean": {n: clean[n].mean(0, keepdim=True).expand_as(clean[n]) for n in names},
        "resample": {n: clean[n][perm] for n in names},
    }
    case.full = full_circuit(model)
    return case


# ---- the plain loop -------------------------------------------------------------------------------
def _writer(name):
    if name == "embed":
        return "embed", -1, 0
    if name.startswith("MLP"):
        return "mlp", int(name[3:]), 0
    return ("head",) + tuple(map(int, re.fullmatch(r"L(\d+)H(\d+)", name).groups()))


def _reader(name, n_layers):
    if name == "logits":
        return "logits", n_layers, 0
    if name.endswith(".in"):
        return "mlp_in", int(name[3:-3]), 0
    layer, _, head, component = re.fullmatch(r"L(\d+)(H|KV)(\d+)\.([qkv])", name).groups()
    return component, int(layer), int(head)


def _reads(writer, reader, parallel):
    """The reader comes after the writer (a head feeds its own block's MLP on sequential blocks)."""
    kind, wl, _ = writer
    component, rl, _ = reader
    if kind == "embed" or component == "logits":
        return True
    if kind == "head" and component == "mlp_in" and not parallel:
        return rl >= wl
    return rl > wl


def _output(model, acts, writer):
    kind, layer, head = writer
    if kind == "embed":
        return acts["hook_embed"]
    if kind == "mlp":
        return acts[f"blocks.{layer}.hook_mlp_out"]
    return acts[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]


def plain_loop(model, tokens, metric, circuits, ablated_acts, writer_names, reader_names):
    """``[n_circuits, ...]``: one hooked forward per circuit, each reader's input rewritten by a hook."""
    L, parallel = model.cfg.n_layers, bool(model.cfg.parallel_attn_mlp)
    writers = [_writer(n) for n in writer_names]
    readers = [_reader(n, L) for n in reader_names]
    ablated = [_output(model, ablated_acts, w).detach() for w in writers]
    values = []
    for circuit in circuits:
        acts, resid = {}, {}

        def keeper(store, name):  # keyed by the name hooked (a hook point's own name may be an alias)
            def keep(act, hook):
                store[name] = act

            return keep

        def lost(r):
            """The sum over writers outside the circuit for reader ``r`` of (this run - ablated)."""
            total = 0.0
            for w, writer in enumerate(writers):
                kept = circuit[w, r]
                if bool(kept.all()) or not _reads(writer, readers[r], parallel):
                    continue
                delta = _output(model, acts, writer) - ablated[w]
                if kept.ndim:  # per position: only where the edge is left out
                    delta = delta * (~kept).float()[None, :, None]
                total = total + delta
            return total

        def reader_hooks():
            hooks = []
            by_point = {}
            for r, (component, layer, head) in enumerate(readers):
                by_point.setdefault((component, layer), []).append((r, head))
            for (component, layer), members in by_point.items():
                if component == "logits":
                    hooks.append(("ln_final.hook_in", lambda act, hook, r=members[0][0]: act - lost(r)))
                elif component == "mlp_in":
                    hooks.append((f"blocks.{layer}.ln2.hook_in", lambda act, hook, r=members[0][0]: act - lost(r)))
                else:
                    def set_heads(act, hook, component=component, layer=layer, members=members):
                        attn = model.blocks[layer].attn
                        W, b = getattr(attn, f"W_{component.upper()}"), getattr(attn, f"b_{component.upper()}", None)
                        act = act.clone()
                        for r, head in members:
                            x = model.blocks[layer].ln1(resid[f"blocks.{layer}.hook_resid_pre"] - lost(r))
                            act[:, :, head] = x @ W[head] + (0 if b is None else b[head])
                        return act

                    hooks.append((f"blocks.{layer}.attn.hook_{component}", set_heads))
            return hooks

        writer_points = ["hook_embed"] + [
            f"blocks.{l}.{h}" for l in range(L) for h in ("attn.hook_z", "hook_mlp_out")
        ]
        # writer hooks first, so a reader at the same point (none here) would see them recorded
        hooks = [(n, keeper(acts, n)) for n in writer_points]
        hooks += [(f"blocks.{l}.hook_resid_pre", keeper(resid, f"blocks.{l}.hook_resid_pre")) for l in range(L)]
        with torch.no_grad():
            values.append(metric(model.run_with_hooks(tokens, fwd_hooks=hooks + reader_hooks())))
    return torch.stack(values)


def _circuits(full, densities, seed, n_pos=None):
    g = torch.Generator().manual_seed(seed)
    shape = full.shape + ((n_pos,) if n_pos else ())
    valid = full[..., None] if n_pos else full
    return torch.stack([(torch.rand(shape, generator=g) < d) & valid for d in densities])


# ---- tests ------------------------------------------------------------------------------------------
BACKENDS = ["hooks", "native"]


def _evaluate(case, backend, *args, **kwargs):
    """``evaluate`` on ``backend``, checking that backend ran (no silent fallback) and the model is left as it was."""
    import fastpatch

    flags = model_flags(case.model)
    out = evaluate(case.model, case.clean, case.corrupted, *args, backend=backend, **kwargs)
    assert fastpatch.last_run_stats()["backend"] == backend
    assert model_flags(case.model) == flags and hook_count(case.model) == 0
    return out


def _reference(case, key, compute):
    """A plain-loop reference computed once per model and shared by both backends' tests."""
    refs = case.__dict__.setdefault("references", {})
    if key not in refs:
        refs[key] = compute()
    return refs[key]


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_matches_plain_loop_every_ablation(case, backend):
    """Circuits of several densities, four ablations in one call, per prompt: equal to the loop."""
    model = case.model
    circuits = _circuits(case.full, (0.15, 0.4, 0.7, 0.9), seed=0)
    ours = _evaluate(case, backend, case.per_example, circuits, ablation=ABLATIONS, reduce="none", seed=SEED)
    assert ours.shape == (len(ABLATIONS), len(circuits), case.clean.shape[0])
    for a, ablation in enumerate(ABLATIONS):
        ref = _reference(case, ("every ablation", ablation), lambda: plain_loop(
            model, case.clean, case.per_example, circuits, case.ablated_acts[ablation], *_names(model)))
        assert_varies(ref, f"{case.name} {ablation} circuits")
        assert_close(ours[a], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_full_circuits(case, backend):
    """Empty circuit = the ablated model, full circuit = the clean model, for every ablation."""
    model = case.model
    circuits = torch.stack([torch.zeros_like(case.full), case.full])
    ours = _evaluate(case, backend, case.per_example, circuits, ablation=ABLATIONS, reduce="none", seed=SEED)
    clean = case.per_example(case.clean_logits)
    for a, ablation in enumerate(ABLATIONS):
        if ablation == "corrupted":
            ablated_model = case.per_example(case.corrupted_logits)
        else:  # every writer's output set to its ablated value, in a run on the clean prompts
            acts = case.ablated_acts[ablation]
            hooks = [(n, lambda act, hook, v=v: v.expand_as(act).clone()) for n, v in acts.items()]
            with torch.no_grad():
                ablated_model = case.per_example(model.run_with_hooks(case.clean, fwd_hooks=hooks))
        assert_close(ours[a, 0], ablated_model)
        assert_close(ours[a, 1], clean)
    assert_varies(torch.stack([ours[:, 0], ours[:, 1]]), "empty vs full circuit values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_position_circuits(case, backend):
    """Per-position masks: an edge left out at some positions of the reader's input only."""
    if case.name != "llama":
        pytest.skip("per-position masks on the grouped-query model only (the suite's time budget)")
    model = case.model
    n_pos = case.clean.shape[1]
    circuits = _circuits(case.full, (0.3, 0.6, 0.85), seed=1, n_pos=n_pos)
    ours = _evaluate(case, backend, case.scalar, circuits, ablation="corrupted")
    ref = _reference(case, "per position", lambda: plain_loop(
        model, case.clean, case.scalar, circuits, case.ablated_acts["corrupted"], *_names(model)))
    assert_varies(ref)
    assert_close(ours, ref)
    # the same mask at every position is the whole-edge circuit
    whole = _circuits(case.full, (0.5,), seed=2)
    assert_close(
        _evaluate(case, backend, case.scalar, whole[..., None].expand(-1, -1, -1, n_pos).clone()),
        _evaluate(case, backend, case.scalar, whole),
    )


def test_native_prefix_computed_once(case):
    """The native plan's cells start where clean and ablated runs first differ: after the prompts' shared
    prefix for the corrupted ablation (2 of 5 positions here, as in IOI prompts), at 0 for zero ablation;
    the full circuit changes nothing (a no-op: the clean run's value)."""
    from fastpatch.circuits.evaluate import ablation_caches
    from fastpatch.engine.circuit_plan import CircuitPlan
    from fastpatch.engine.native import NativeModel

    model = case.model
    assert bool((case.clean[:, :2] == case.corrupted[:, :2]).all()) and bool((case.clean[:, 2] != case.corrupted[:, 2]).any())
    circuits = torch.stack([_circuits(case.full, (0.5,), seed=5)[0], case.full])
    plan = CircuitPlan(model, case.clean, circuits, ablation_caches(model, ["corrupted", "zero"], case.clean, case.corrupted))
    engine = NativeModel.checked(model, case.clean)
    plan.prepare(engine)
    work = plan.native_work(engine, plan.cells)
    starts = {plan.cells[m.cell]: start for start, members in work.groups.items() for m in members}
    cell = type(plan.cells[0])
    assert starts == {cell(0, 0): 2, cell(0, 1): 0}
    assert [plan.cells[i] for i in work.no_ops] == [cell(1, 0)]


def test_backend_fallback():
    """Where the native plan does not give the hook form's values (BLOOM: TransformerLens's Q/K/V fork takes the
    rewrite after ln1), "auto" runs on hooks with the one-line warning of every plan, and "native" refuses."""
    import fastpatch

    model = zoo.arch("bloom")
    clean, corrupted = zoo.prompt_pair()
    full = full_circuit(model)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 0].mean()

    with pytest.warns(UserWarning, match="native backend unsupported for BloomForCausalLM: Q/K/V readers in blocks"):
        auto = evaluate(model, clean, corrupted, metric, torch.stack([full, torch.zeros_like(full)]))
    assert fastpatch.last_run_stats()["backend"] == "hooks"
    with torch.no_grad():  # the full circuit is the clean run, the empty one the corrupted run
        assert_close(auto, torch.stack([metric(model(clean)), metric(model(corrupted))]))
    with pytest.raises(ValueError, match="take the rewrite after the norm"):
        evaluate(model, clean, corrupted, metric, full[None], backend="native")
    assert hook_count(model) == 0
    # an MLP sharing the attention's norm has no input hook: no backend defines that reader, both refuse up front
    phi = zoo.arch("phi")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="has no blocks.0.ln2.hook_in"):
            evaluate(phi, clean, corrupted, metric, full_circuit(phi)[None], backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "qwen3", "mixtral", "opt"])
def test_native_on_other_architectures(name):
    """The native plan equals the plain loop on soft caps, sliding windows and post-norms (Gemma 2), QK-norm
    (Qwen3), a mixture of experts (Mixtral) and a model without the per-head Q/K/V fork (OPT, hooks refuse)."""
    import fastpatch

    model = zoo.arch(name)
    clean, corrupted = zoo.prompt_pair()
    circuits = _circuits(full_circuit(model), (0.3, 0.7), seed=0)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, :5].sum(-1)

    ours = evaluate(model, clean, corrupted, metric, circuits, ablation=["corrupted", "zero"], reduce="none", seed=SEED)
    assert fastpatch.last_run_stats()["backend"] == "native"
    names = ["hook_embed"] + [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in ("attn.hook_z", "hook_mlp_out")]
    with torch.no_grad():
        _, corrupted_acts = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    for a, acts in enumerate([{n: corrupted_acts[n] for n in names}, {n: torch.zeros_like(corrupted_acts[n]) for n in names}]):
        ref = plain_loop(model, clean, metric, circuits, acts, *_names(model))
        assert_varies(ref, f"{name} circuits")
        assert_close(ours[a], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_values(case, backend):
    if case.name != "gpt2":
        pytest.skip("one model is enough for the chunk cuts")
    import fastpatch

    circuits = _circuits(case.full, (0.2, 0.5, 0.8), seed=4)
    kwargs = dict(ablation=["corrupted", "mean"], reduce="none")
    one = _evaluate(case, backend, case.per_example, circuits, chunk_size=1, **kwargs)
    assert fastpatch.last_run_stats()["max_cells_per_chunk"] == 1
    tiny = _evaluate(case, backend, case.per_example, circuits, memory_budget=1, **kwargs)
    whole = _evaluate(case, backend, case.per_example, circuits, chunk_size=100, **kwargs)
    assert fastpatch.last_run_stats()["max_cells_per_chunk"] > 1
    assert_close(one, whole)
    assert_close(tiny, whole)
    # repeated circuits run once, the full circuit (the clean run) under one ablation only
    stacked = torch.stack([circuits[0], case.full, circuits[0], circuits[1]])
    values = _evaluate(case, backend, case.per_example, stacked, **kwargs)
    assert fastpatch.last_run_stats()["cells"] == 2 * 2 + 1
    assert_close(values[:, [0, 2, 3]], whole[:, [0, 0, 1]])
    assert_close(values[:, 1], case.per_example(case.clean_logits).expand(2, -1))


def _names(model):
    from fastpatch.engine.edge_plan import edge_layout

    layout = edge_layout(model.cfg)
    return layout.writer_names, layout.reader_names


def test_bad_input_raises(case):
    if case.name != "gpt2":
        pytest.skip("argument checks need one model")
    model, clean, corrupted, metric = case.model, case.clean, case.corrupted, case.scalar
    full = case.full
    bad = [
        (dict(circuits=full[None].float()), "boolean"),
        (dict(circuits=full), r"add a circuit axis"),
        (dict(circuits=full[None, :, :-1]), "shape"),
        (dict(circuits=torch.ones_like(full)[None]), "does not exist"),
        (dict(circuits=full[None], ablation="gaussian"), "ablation must be one of"),
        (dict(circuits=full[None], ablation=[]), "empty"),
        (dict(circuits=full[None], reduce="mean"), "reduce"),
        (dict(circuits=full[None], backend="gpu"), "backend must be one of"),
        (dict(circuits=full[None], corrupted_tokens=None), "needs corrupted_tokens"),
        (dict(circuits=full[None], corrupted_tokens=corrupted[:, :-1]), "same shape"),
    ]
    for kwargs, message in bad:
        args = dict(corrupted_tokens=corrupted)
        args.update(kwargs)
        circuits = args.pop("circuits")
        with pytest.raises(ValueError, match=message):
            evaluate(model, clean, args.pop("corrupted_tokens"), metric, circuits, **args)
        assert hook_count(model) == 0
    # a model without the per-head Q/K/V input fork is refused by name on the hook backend; the native
    # backend ("auto" picks it) needs no fork and equals the plain loop there
    native_model = zoo.native()
    full_native = full_circuit(native_model)
    with pytest.raises(ValueError, match="per-head fork"):
        evaluate(native_model, clean, corrupted, metric, full_native[None], backend="hooks")
    assert hook_count(native_model) == 0
    circuits = _circuits(full_native, (0.3, 0.7), seed=6)
    import fastpatch

    ours = evaluate(native_model, clean, corrupted, metric, circuits)
    assert fastpatch.last_run_stats()["backend"] == "native"
    with torch.no_grad():
        _, ablated = native_model.run_with_cache(corrupted)
    ref = plain_loop(native_model, clean, metric, circuits, ablated, *_names(native_model))
    assert_varies(ref)
    assert_close(ours, ref)
    # zero / mean / resample need no corrupted prompts
    out = evaluate(model, clean, None, metric, full[None], ablation=["zero", "mean", "resample"])
    assert out.shape == (3, 1)


# ---- faithfulness curves --------------------------------------------------------------------------
def _reader_nodes(name, n_heads, n_kv):
    """The heads / MLP a reader feeds (none for the logits), by name."""
    if name == "logits":
        return set()
    if name.endswith(".in"):
        return {name[:-3]}
    layer, kind, head, _ = re.fullmatch(r"L(\d+)(H|KV)(\d+)\.([qkv])", name).groups()
    if kind == "H":
        return {f"L{layer}H{head}"}
    group = n_heads // n_kv
    return {f"L{layer}H{h}" for h in range(int(head) * group, (int(head) + 1) * group)}


def reference_prune(edges, writer_names, reader_names, n_heads, n_kv):
    """Set-based pruning from the definition: drop nodes without an incoming or without an outgoing edge."""
    edges = set(edges)
    while True:
        has_input = {n for _, r in edges for n in _reader_nodes(reader_names[r], n_heads, n_kv)}
        has_output = {writer_names[w] for w, _ in edges if writer_names[w] != "embed"}
        alive = has_input & has_output
        kept = {
            (w, r) for w, r in edges
            if (writer_names[w] == "embed" or writer_names[w] in alive)
            and (reader_names[r] == "logits" or _reader_nodes(reader_names[r], n_heads, n_kv) & alive)
        }
        if kept == edges:
            return kept
        edges = kept


def _node_map_case(case, seed):
    """The model, its full circuit, names, random edge scores and KV head count for the node-map references."""
    if case.name == "neox":
        pytest.skip("sequential (gpt2) and grouped-query (llama) wiring cover the node maps")
    model, full = case.model, case.full
    scores = torch.randn(full.shape, generator=torch.Generator().manual_seed(seed)) * full
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model, full, *_names(model), scores, n_kv


def test_top_n_random_and_pruning(case):
    """Top-n against a sort of (score, edge) pairs; random circuits' sizes; pruning against the set-based reference."""
    from fastpatch.circuits.faithfulness import prune_dangling, random_circuits, top_n_circuits

    model, full, writer_names, reader_names, scores, n_kv = _node_map_case(case, seed=5)
    scores[0, -1] = scores[1, -1] = 7.0  # a tie: the earlier edge goes first
    edges = [(w, r) for w, r in torch.nonzero(full).tolist()]
    ranked = sorted(edges, key=lambda e: (-abs(float(scores[e])), edges.index(e)))
    counts = [0, 1, 2, 7, 40, len(edges)]
    top = top_n_circuits(scores, full, counts)
    for count, circuit in zip(counts, top):
        assert {tuple(e) for e in torch.nonzero(circuit).tolist()} == set(ranked[:count])
    rand = random_circuits(full, counts, n_draws=2, seed=0)
    assert rand.sum((2, 3)).tolist() == [counts, counts] and not (rand & ~full).any()
    assert not torch.equal(rand[0], rand[1])
    # pruning: sparse circuits, where most heads lose their inputs or outputs
    cfg = model.cfg
    sparse = _circuits(full, (0.04, 0.08, 0.15, 0.3), seed=6)
    pruned = prune_dangling(model, sparse)
    changed = 0
    for before, after in zip(sparse, pruned):
        expected = reference_prune(
            [tuple(e) for e in torch.nonzero(before).tolist()], writer_names, reader_names, cfg.n_heads, n_kv
        )
        assert {tuple(e) for e in torch.nonzero(after).tolist()} == expected
        changed += int(before.sum() - after.sum())
    assert changed > 0, "pruning removed nothing: the check proves nothing"
    # by hand: a head with no input is dropped with its edge to the logits; given an input it stays
    w, q, logits = writer_names.index("L0H0"), reader_names.index("L0H0.q"), reader_names.index("logits")
    alone = torch.zeros_like(full)
    alone[w, logits] = True
    fed = alone.clone()
    fed[0, q] = True
    out = prune_dangling(model, torch.stack([alone, fed]))
    assert not out[0].any() and torch.equal(out[1], fed)


def test_faithfulness_curve(case):
    """The curve's circuits, values, normalisation and areas, checked against independent computations."""
    import numpy as np

    from fastpatch.circuits.faithfulness import prune_dangling, top_n_circuits

    if case.name != "gpt2":
        pytest.skip("one model: evaluate itself is checked on every model above")
    from fastpatch.circuits import faithfulness_curve

    model, full = case.model, case.full
    scores = torch.randn(full.shape, generator=torch.Generator().manual_seed(7)) * full
    sizes = (0.01, 0.05, 0.2, 3, 0.6, 1.0)
    n_items = int(full.sum())
    curve = faithfulness_curve(
        model, case.clean, case.corrupted, case.scalar, scores, sizes=sizes, ablation=["corrupted", "zero"], n_random=2
    )
    counts = [int(s * n_items) if isinstance(s, float) else s for s in sizes]
    assert curve.counts.tolist() == counts and curve.n_edges.tolist() == counts
    assert torch.equal(curve.circuits, top_n_circuits(scores, full, counts))
    direct = evaluate(model, case.clean, case.corrupted, case.scalar, curve.circuits, ablation=["corrupted", "zero"])
    assert_close(curve.values, direct)
    assert_varies(curve.values[0], "curve values")
    assert_varies(curve.random_values[0], "random baseline values")
    clean = case.scalar(case.clean_logits)
    assert_close(curve.clean, clean.expand(2))
    assert_close(curve.ablated[0], case.scalar(case.corrupted_logits))
    expected = (curve.values - curve.ablated[:, None]) / (curve.clean - curve.ablated)[:, None]
    assert_close(curve.faithfulness, expected)
    assert_close(curve.faithfulness[:, -1], torch.ones(2))  # the 100% circuit is the clean model
    order = np.argsort(counts, kind="stable")
    x = np.array(counts, dtype=float)[order] / n_items
    for a in range(2):
        f = curve.faithfulness[a].double().numpy()[order]
        assert abs(float(curve.cpr[a]) - np.trapezoid(f, x)) < 1e-5 * max(1.0, abs(np.trapezoid(f, x)))
        assert abs(float(curve.cmd[a]) - np.trapezoid(np.abs(1 - f), x)) < 1e-5
    # pruned: each circuit is its top-n circuit pruned, evaluated as such
    pruned = faithfulness_curve(model, case.clean, case.corrupted, case.scalar, scores, sizes=sizes[:3], n_random=1, prune=True)
    assert torch.equal(pruned.circuits, prune_dangling(model, top_n_circuits(scores, full, counts[:3])))
    assert (pruned.n_edges <= torch.tensor(counts[:3])).all()
    assert_close(pruned.values[0], evaluate(model, case.clean, case.corrupted, case.scalar, pruned.circuits))
    with pytest.raises(ValueError, match="fraction"):
        faithfulness_curve(model, case.clean, case.corrupted, case.scalar, scores, sizes=(1.5,))
    with pytest.raises(ValueError, match="edge scores"):
        faithfulness_curve(model, case.clean, case.corrupted, case.scalar, scores[:-1])


# ---- discovery ------------------------------------------------------------------------------------
def reference_greedy(scores, full, writer_names, reader_names, n_heads, n_kv, count):
    """EAP-IG's greedy search written as a scan: each step adds the best edge into a node already in the circuit."""
    nodes, chosen = {"logits"}, []
    edges = [tuple(e) for e in torch.nonzero(full).tolist()]
    for _ in range(count):
        best = None
        for w, r in edges:
            reader_nodes = {"logits"} if reader_names[r] == "logits" else _reader_nodes(reader_names[r], n_heads, n_kv)
            if (w, r) in chosen or not reader_nodes & nodes:
                continue
            if best is None or abs(float(scores[w, r])) > abs(float(scores[best])):
                best = (w, r)
        chosen.append(best)
        nodes.add(writer_names[best[0]])
    return set(chosen)


def test_greedy_circuits(case):
    from fastpatch.circuits.discovery import greedy_circuits

    model, full, writer_names, reader_names, scores, n_kv = _node_map_case(case, seed=8)
    counts = [1, 5, 20, 60]
    circuits = greedy_circuits(model, scores, counts)
    for count, circuit in zip(counts, circuits):
        expected = reference_greedy(scores, full, writer_names, reader_names, model.cfg.n_heads, n_kv, count)
        assert {tuple(e) for e in torch.nonzero(circuit).tolist()} == expected
    # greedy differs from top-n: an edge into a node outside the circuit waits for that node
    from fastpatch.circuits.faithfulness import top_n_circuits

    assert not torch.equal(circuits[1], top_n_circuits(scores, full, [5])[0])
    if case.name == "gpt2":  # the curve's greedy circuits are these, evaluated as such
        from fastpatch.circuits import faithfulness_curve

        curve = faithfulness_curve(model, case.clean, case.corrupted, case.scalar, scores, sizes=counts, method="greedy", n_random=0)
        assert torch.equal(curve.circuits, circuits)
        assert_close(curve.values[0], evaluate(model, case.clean, case.corrupted, case.scalar, circuits))


@pytest.fixture(scope="module")
def small_gpt2():
    model = zoo.gpt2(n_layers=2)
    clean, corrupted = zoo.prompt_pair(batch=3, n_pos=5, first_diff=1)
    return model, clean, corrupted


def test_acdc_equals_sequential_search(small_gpt2):
    """Batched ACDC makes the decisions of the sequential search, one forward per candidate removal."""
    from fastpatch.circuits.discovery import acdc
    from fastpatch.metrics import KLDivergence

    model, clean, corrupted = small_gpt2
    with torch.no_grad():
        metric = KLDivergence(model(clean))
    full = full_circuit(model)
    threshold = 0.05  # decisions here are >= 5e-3 away from it (fp noise is ~1e-7)
    ours = acdc(model, clean, corrupted, threshold)
    import fastpatch

    assert fastpatch.last_run_stats()["backend"] == "native"

    def value(circuit):  # one hooked forward per candidate; the batched search runs on the default (native) backend
        return float(evaluate(model, clean, corrupted, metric, circuit[None], backend="hooks")[0])

    current, m = full.clone(), value(full)
    for r in reversed(range(full.shape[1])):
        for w in reversed(torch.nonzero(current[:, r]).flatten().tolist()):
            trial = current.clone()
            trial[w, r] = False
            m_new = value(trial)
            if m_new - m < threshold:
                current, m = trial, m_new
    kept = int(current.sum())
    assert 0 < kept < int(full.sum()), f"threshold keeps {kept} edges: the comparison proves little"
    assert torch.equal(ours.circuit, current)
    assert abs(ours.metric - m) <= 1e-5 * max(1.0, abs(m))
    assert ours.passes < ours.visited  # candidates into a reader shared passes
    with pytest.raises(ValueError, match="positive"):
        acdc(model, clean, corrupted, 0.0)


# ---- figures --------------------------------------------------------------------------------------
def test_figures(case):
    """The curve figure carries the curve's numbers; the graph one line per circuit edge and reader node."""
    from fastpatch.circuits import faithfulness_curve
    from fastpatch.circuits.plots import circuit_graph_figure, faithfulness_figure

    if case.name != "llama":
        pytest.skip("one (grouped-query) model")
    model, full = case.model, case.full
    scores = torch.randn(full.shape, generator=torch.Generator().manual_seed(9)) * full
    curve = faithfulness_curve(model, case.clean, case.corrupted, case.scalar, scores, sizes=(0.1, 0.5, 1.0),
                               ablation=["corrupted", "zero"], n_random=1)
    fig = faithfulness_figure(curve)
    assert len(fig.data) == 4  # a curve and a random baseline per ablation
    assert list(fig.data[0].y) == pytest.approx(curve.faithfulness[0].tolist())
    assert "CPR" in fig.data[0].name
    circuit = curve.circuits[0]
    graph = circuit_graph_figure(model, circuit, scores)
    _, reader_names = _names(model)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    expected = sum(group if "KV" in reader_names[r] else 1 for _, r in torch.nonzero(circuit).tolist())
    assert len(graph.data) == expected + 1  # one line per (edge, node it feeds) and the node markers
    with pytest.raises(ValueError, match="boolean"):
        circuit_graph_figure(model, circuit.float(), scores)


def test_no_state_left_when_the_metric_raises(case):
    """A metric that fails inside the batched pass leaves no hook and no flag changed on the model."""
    model = case.model
    flags = model_flags(model)

    def failing(logits):
        raise RuntimeError("metric failed")

    circuits = _circuits(case.full, (0.5,), seed=1)
    for backend in BACKENDS:
        with pytest.raises(RuntimeError, match="metric failed"):
            evaluate(model, case.clean, case.corrupted, failing, circuits, ablation="zero", seed=SEED, backend=backend)
        assert model_flags(model) == flags and hook_count(model) == 0
