import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("tests/gpu runs compiled Triton kernels: unset TRITON_INTERPRET")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="tests/gpu needs a CUDA GPU")
        for item in items:
            item.add_marker(skip)
