"""Shared fixtures. Triton's interpreter must be chosen before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The tests' tensors are tiny: one intra-op thread is faster than a thread pool's hand-offs, and far
# faster on a busy machine, where every op otherwise waits for a second thread to be scheduled.
torch.set_num_threads(1)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=sorted(zoo.ZOO))
def zoo_case(request):
    """One zoo model with a prompt pair, its clean cache and metrics (built once per test module)."""
    return zoo.Case.build(request.param)
