"""The direct path walkthrough (docs/walkthrough_direct_path.py) runs end to end; its asserts check
the hand-made direct path patch against the library call and the circuit it finds.

It runs in this process (``runpy``), as a notebook kernel would, so it shares the already imported
libraries; the global grad mode it switches off is restored afterwards."""

import runpy
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "walkthrough_direct_path.py"


def test_walkthrough_runs_and_its_checks_pass(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--prompts", "16", "--half-len", "12"])
    grad_enabled = torch.is_grad_enabled()
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        torch.set_grad_enabled(grad_enabled)
    out = capsys.readouterr().out
    assert "keys, by hand:" in out and "linearised K paths" in out and "L1H" in out
