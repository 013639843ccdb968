"""Shared fixtures; tests marked `gpu` are skipped where CUDA is not available."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Triton kernels run under the interpreter where there is no GPU; the variable must be set before
# triton is first imported, which happens when a test module imports tactic_server.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
