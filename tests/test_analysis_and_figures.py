"""Effects, summaries and figures on real sweep results."""

import pandas as pd
import pytest
import torch
import zoo
from helpers import assert_close

from fastpatch import analysis, figures
from fastpatch import patching as fp


@pytest.fixture(scope="module")
def case():
    return zoo.Case.build("gpt2")


@pytest.fixture(scope="module")
def heads(case):
    return fp.get_act_patch_attn_head_out_all_pos(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)


def test_normalized_effect(case, heads):
    with torch.no_grad():
        clean = case.scalar(case.model(case.clean))
        corrupted = case.scalar(case.model(case.corrupted))
    effect = analysis.normalized_effect(heads, clean, corrupted)
    assert_close(effect, (heads - corrupted) / (clean - corrupted))
    assert_close(analysis.normalized_effect(torch.stack([corrupted, clean]), clean, corrupted), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="coincide"):
        analysis.normalized_effect(heads, corrupted, corrupted)


def test_top_k_and_important_heads(heads):
    table = analysis.top_k(heads, ("layer", "head"), k=4)
    assert list(table.columns) == ["layer", "head", "value"] and len(table) == 4
    flat = heads.reshape(-1)
    expected = flat[flat.abs().argsort(descending=True)[:4]]
    assert table["value"].tolist() == pytest.approx(expected.tolist())
    for _, row in table.iterrows():
        assert heads[int(row["layer"]), int(row["head"])].item() == pytest.approx(row["value"])
    threshold = float(heads.abs().median())
    important = analysis.find_important_heads(heads, threshold)
    assert len(important) == int((heads.abs() >= threshold).sum())
    with pytest.raises(ValueError, match="axis names"):
        analysis.top_k(heads, ("layer",))


def test_report_is_self_contained_html(tmp_path, case, heads):
    resid = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    tokens = [f"t{int(t)}" for t in case.corrupted[0]]
    path = figures.write_report(
        tmp_path / "report.html",
        [
            ("Heads", figures.layer_head_heatmap(heads)),
            ("Residual stream", figures.layer_position_heatmap(resid, tokens)),
            ("Top heads", analysis.top_k(heads, ("layer", "head"), k=3)),
            ("Attribution", figures.attribution_scatter(heads, heads * 0.9)),
            ("Notes", "a <plain> note"),
        ],
    )
    text = path.read_text()
    assert text.count("<h2>") == 5 and "&lt;plain&gt;" in text
    assert '<script src="http' not in text  # plotly.js inlined, nothing fetched from the network
    assert text.count("Plotly.newPlot") == 3
    for label in tokens:
        assert label in text
    assert isinstance(analysis.top_k(heads, ("layer", "head")), pd.DataFrame)


def test_heatmap_rejects_bad_shapes(heads):
    with pytest.raises(ValueError, match="2-D"):
        figures.heatmap(heads[0], x_label="head")
    with pytest.raises(ValueError, match="labels"):
        figures.layer_position_heatmap(heads, ["a"])
