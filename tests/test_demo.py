"""``fastpatch demo`` on a smaller setting: it recovers the shipped model's circuit from scratch,
agrees with TransformerLens, and writes a report; its bad options exit with code 2."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastpatch.cli import main
from fastpatch.cli.demo import report_path, run_demo
from fastpatch.models import induction_model_info

N_PROMPTS, HALF_LEN, SEED = 12, 12, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    return run_demo(out, n_prompts=N_PROMPTS, half_len=HALF_LEN, seed=SEED, compare=True, progress=False, repeats=1,
                    echo=lambda s: None)


def test_demo_recovers_the_recorded_circuit(demo):
    circuit = induction_model_info()["circuit"]
    assert demo.recovered
    assert demo.previous_token_heads == [tuple(x) for x in circuit["previous_token_heads"]]
    assert demo.induction_heads and set(demo.induction_heads) <= {tuple(x) for x in circuit["induction_heads"]}
    # The important heads are found from the patching values, not read from the metadata: re-derive them.
    normalised = (demo.values["heads"] - demo.corrupted_value) / (demo.clean_value - demo.corrupted_value)
    found = {(int(l), int(h)) for l, h in torch.nonzero(normalised >= 0.3).tolist()}
    assert found == set(demo.previous_token_heads) | set(demo.induction_heads)
    assert demo.strongest_path["component"] == "k"
    assert demo.strongest_path["source"] in demo.previous_token_heads
    assert demo.strongest_path["destination"] in demo.induction_heads


def test_demo_agrees_with_transformer_lens_and_writes_a_report(demo):
    assert list(demo.timings["call"]) == [
        "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_all_pos_every", "get_act_patch_resid_pre"] + [
        f"get_act_patch_direct_path_all_sources({c})" for c in "qkv"]
    assert (demo.timings["max_abs_diff"] < 1e-4).all()
    cells = demo.timings["cells"].tolist()
    assert cells[:3] == [demo.values[k].numel() for k in ("heads", "every", "resid")]
    assert cells[1] == 5 * cells[0] and cells[3] == cells[4] == cells[5]  # out/q/k/v/pattern per head; q/k/v paths
    page = demo.report.read_text()
    assert page.count("Plotly.newPlot") >= 9  # heads, 5 head components, residual, K and Q paths, scatter
    assert "circuit recovered: yes" in page and "L0H3" in page


def test_demo_shows_exact_edges_beside_attribution(demo):
    """Exact edges from a layer-0 head into a layer-1 head's keys/queries are the demo's (TransformerLens-
    checked) direct paths minus the corrupted value; attribution lies on the same grid."""
    exact, attribution = demo.values["exact_edges"], demo.values["attribution_edges"]
    assert exact.shape == attribution.shape
    H = demo.values["direct_path_k"].shape[0]
    for c in "qk":
        rows = [1 + s for s in range(H)]  # writers: embed, then layer 0's heads
        cols = [d for d in range(H)] if c == "q" else [H + d for d in range(H)]
        cols = [3 * H + 1 + col for col in cols]  # readers: layer 0's q, k, v, MLP, then layer 1's
        torch.testing.assert_close(exact[rows][:, cols], demo.values[f"direct_path_{c}"], rtol=1e-4, atol=1e-4)
    assert float(exact.abs().max()) > 1e-2
    assert "Top edges, exact" in demo.report.read_text()


def test_demo_faithfulness_curve_and_zero_ablation(demo):
    """The demo's curve: top-n circuits of its exact edge scores whose full and empty circuits are the plain clean and
    corrupted forwards; the drawn circuit evaluates (``circuits.evaluate``) to the faithfulness shown and keeps most
    of the behaviour at a small size. The zero-ablation head sweep equals TransformerLens's own with the same cache."""
    import transformer_lens.patching as tl

    from fastpatch.circuits import evaluate, full_circuit
    from fastpatch.metrics import LogitDiff
    from fastpatch.models import induction_prompts, load_induction_model
    from fastpatch.sources import zero_ablation

    model = load_induction_model()
    clean, corrupted, answer, wrong = induction_prompts(N_PROMPTS, HALF_LEN, SEED)
    metric = LogitDiff(answer, wrong)
    curve = demo.curve
    assert curve.ablations == ["corrupted", "zero"]
    scale = max(1.0, abs(demo.clean_value))
    torch.testing.assert_close(curve.clean, torch.full((2,), demo.clean_value), rtol=0, atol=1e-5 * scale)
    assert abs(float(curve.ablated[0]) - demo.corrupted_value) <= 1e-5 * scale
    shown = curve.circuits[demo.shown_circuit]
    valid, magnitude = full_circuit(model), demo.values["exact_edges"].abs()
    assert float(magnitude[shown].min()) >= float(magnitude[valid & ~shown].max())  # the top-n exact edges
    again = evaluate(model, clean, corrupted, metric, shown[None], ablation=["corrupted", "zero"])[:, 0]
    faith = (again - curve.ablated) / (curve.clean - curve.ablated)
    torch.testing.assert_close(faith, curve.faithfulness[:, demo.shown_circuit], rtol=1e-4, atol=1e-4)
    assert float(faith[0]) >= 0.8 and int(shown.sum()) <= int(valid.sum()) // 3
    assert float(curve.faithfulness.max() - curve.faithfulness.min()) > 0.5
    theirs = tl.get_act_patch_attn_head_out_all_pos(model, clean, zero_ablation(model, clean), metric)
    ours = demo.values["zero_ablated_heads"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
    assert float(ours.max() - ours.min()) > 0.1
    page = demo.report.read_text()
    assert "faithfulness of the top-n exact edges" in page and "Circuit graph" in page and "zero-ablated" in page


def test_demo_command_line(tmp_path, capsys):
    out = tmp_path / "cli.html"  # a name that already ends in .html is used as given
    code = main(["demo", "--prompts", "6", "--half-len", "10", "--no-compare", "--quiet", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "circuit recovered: yes" in text and out.is_file() and list(tmp_path.iterdir()) == [out]


def test_report_path():
    assert report_path("x") == Path("x.html") and report_path("x.html") == Path("x.html")
    assert report_path(Path("d/run.v2")) == Path("d/run.v2.html")


@pytest.mark.parametrize("option, message", [
    (["--prompts", "0"], "--prompts must be positive"),
    (["--half-len", "40"], "--half-len must be in"),
    (["--threshold", "2"], "--threshold must be in"),
])
def test_demo_bad_options_exit_2(option, message, capsys):
    assert main(["demo", "--quiet", *option]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_demo_report_renders_in_chromium(demo):
    """Every figure of the demo's report is drawn by the inlined plotly.js in a real browser."""
    browser = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=15000"]
    dom = subprocess.run(browser + ["--dump-dom", demo.report.as_uri()], capture_output=True, text=True, timeout=180).stdout
    assert dom.count("heatmaplayer") >= 8  # head output, q/k/v/pattern, residual stream, K and Q paths
    assert dom.count("scatterlayer") >= 1 and "circuit recovered: yes" in dom
