"""The batched execution engine behind every sweep.

Layers, from the bottom up:

- ``checks``: input validation shared by every entry point (clear ``ValueError``s).
- ``model_state``: a guard that leaves no hook or flag changed after a call, even one that raises.
- ``setters``: batched counterparts of TransformerLens's patch setters (one masked write per
  hooked activation instead of one forward pass per patch).
- ``plan``: sweeps -> cells -> memory-budgeted chunks.
- ``hooks_backend``: runs one chunk through ``model.run_with_hooks`` with the cells stacked
  along the batch dimension.
- ``runner``: drives the chunks, applies the caller's metrics to each cell's row block and
  makes one host transfer per sweep.
"""
