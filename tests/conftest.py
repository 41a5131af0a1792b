from __future__ import annotations

import os
import sys

import pytest
import torch

# TICKETC_WITHOUT_TRITON=1 runs the suite as on an install without the gpu extra: `import
# triton` fails (tests/test_packaging.py checks that the Triton tests then skip cleanly).
if os.environ.get("TICKETC_WITHOUT_TRITON") == "1":
    sys.modules["triton"] = None  # type: ignore[assignment]

# Triton kernels run through the interpreter on machines without a GPU (CI); this must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
