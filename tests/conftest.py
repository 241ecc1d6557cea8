"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
