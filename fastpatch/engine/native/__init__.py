"""Native backend: a functional forward that does only the compute a sweep needs.

- ``model``: the functional forward built from the TransformerLens-standard weights, its full
  trace of the corrupted run, and the parity check against the model's own forward.
- ``cells``: for each patch type, the residual stream a cell's rows enter the model with
  (recomputing one head where the patch is inside attention), and where they enter.
- ``backend``: groups cells by first changed position, lets rows join the batch at their entry
  block, reuses the corrupted run's K/V prefix, and computes only the logits a metric reads.
"""

from fastpatch.engine.native.model import NativeEngine, NativeModel, ParityError, UnsupportedModel

__all__ = ["NativeEngine", "NativeModel", "ParityError", "UnsupportedModel"]
