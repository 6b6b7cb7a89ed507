"""The HTML report renders in a real browser: headless Chromium (Debian's ``chromium`` package)
runs the inlined plotly.js and draws every figure. Skipped where Chromium is not installed
(``apt-get install chromium``)."""

import shutil
import subprocess

import pytest
import zoo

from fastpatch import analysis, figures
from fastpatch import patching as fp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_report_heatmaps_render_in_chromium(tmp_path):
    case = zoo.Case.build("gpt2")
    heads = fp.get_act_patch_attn_head_out_all_pos(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    resid = fp.get_act_patch_resid_pre(case.model, case.corrupted, case.clean_cache, case.scalar, progress=False)
    report = figures.write_report(tmp_path / "report.html", [
        ("Heads", figures.layer_head_heatmap(heads)),
        ("Residual stream", figures.layer_position_heatmap(resid, [f"tok{int(t)}" for t in case.corrupted[0]])),
        ("Top heads", analysis.top_k(heads, ("layer", "head"), k=3)),
    ])
    # one browser run draws the page, dumps its DOM and takes a screenshot
    shot = tmp_path / "report.png"
    browser = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=10000",
               "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1100,1400", "--dump-dom"]
    dom = subprocess.run(browser + [report.as_uri()], capture_output=True, text=True, timeout=180).stdout
    assert dom.count('class="main-svg"') >= 2, "plotly did not draw the figures"
    assert dom.count("heatmaplayer") >= 2 and "tok" in dom
    assert shot.stat().st_size > 20_000  # a blank page is a few kB; rendered heatmaps are far more
