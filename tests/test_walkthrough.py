"""The direct path walkthrough (docs/walkthrough_direct_path.py) runs end to end; its asserts check
the hand-made direct path patch against the library call and the circuit it finds."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "walkthrough_direct_path.py"


def test_walkthrough_runs_and_its_checks_pass():
    env = {**os.environ, "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--prompts", "16", "--half-len", "12"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "keys, by hand:" in out and "linearised K paths" in out and "L1H" in out
