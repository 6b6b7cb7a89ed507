"""Plain-PyTorch references of the fused operations, with the public dispatching functions.

``<op>_reference(...)`` computes in fp32 on any device; ``<op>(...)`` calls the Triton kernel
from ``csrc_triton`` where one applies and the reference otherwise.

Ops: ``delta_projection`` (direct path patching: a source's write projected into every
destination's Q/K/V input) and ``edge_scores`` (edge attribution: writer deltas contracted with the
Q/K/V readers' input gradients through the linearised norm).
"""
