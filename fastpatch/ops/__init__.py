"""Fused operations: their plain-PyTorch references and the public functions that dispatch.

Each ``fastpatch/ops/<op>.py`` holds ``<op>_reference(...)`` (plain PyTorch, fp32 math, any
device) and the public ``<op>(...)``, whose ``backend`` is one vocabulary for every op
(``fastpatch.ops.triton_dispatch.BACKENDS``): ``"triton"`` runs the kernel in
``csrc_triton/<op>.py``, ``"torch"`` the op's PyTorch path, and ``"auto"`` the kernel where it
applies and is predicted faster (``bench/kernel_resources.py``), the PyTorch path otherwise.

Ops:

- ``delta_projection`` (direct path patching: a source's write projected into every destination's
  Q/K/V input); its PyTorch path is the reference.
- ``edge_scores`` (edge attribution: writer deltas contracted with the Q/K/V readers' input
  gradients through the linearised norm); its PyTorch path is a row-chunked form of the reference
  that never holds the ``[reader, row, d_model]`` gradients, and ``"auto"`` takes the kernel only
  for half-precision writers (in fp32 the chunked path is predicted faster).
"""
