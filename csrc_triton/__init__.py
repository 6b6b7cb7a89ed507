"""Triton kernels (see docs/architecture.md, section 5).

Each module holds ``_<op>_kernel`` and its launcher; the plain-PyTorch reference with the same
signature lives in ``fastpatch/ops/<op>.py``. Set ``TRITON_INTERPRET=1`` before importing a
kernel module to run it on CPU.
"""
