"""The ``fastpatch`` command line (see ``fastpatch --help``).

- ``fastpatch demo``: sweeps, direct paths and attribution on the shipped induction model, timed
  against TransformerLens, with an HTML report (:mod:`fastpatch.cli.demo`).
- ``fastpatch sweep``: one sweep on a local Hugging Face model folder with prompt pairs from a file.
"""

from fastpatch.cli.main import main

__all__ = ["main"]
