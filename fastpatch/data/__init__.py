"""Package data: the small trained models fastpatch ships (see :mod:`fastpatch.models`).

- ``induction_2l.pt``: ``{"state_dict": ..., "config": ...}`` of a 2-layer rotary GPT-NeoX trained on
  repeated random token sequences; ``induction_2l.json``: its config, training metadata and the
  circuit found in it (written by ``scripts/train_induction_model.py``).
- ``greater_than_3l.pt`` / ``.json``: a 3-layer GPT-2 trained on a synthetic greater-than task, its
  metadata and circuit (written by ``scripts/train_greater_than_model.py``).
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
