"""Plain-PyTorch references of the fused operations, with the public dispatching functions.

``<op>_reference(...)`` computes in fp32 on any device; ``<op>(...)`` calls the Triton kernel
from ``csrc_triton`` where one applies and the reference otherwise.
"""
