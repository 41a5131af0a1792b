from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The repository's kernels/ folder (installed as ticketc.kernels) shadows Hugging Face's `kernels`
# distribution whenever the repository root is on sys.path (pytest's rootdir, `python -m`), and
# transformers then fails on `from kernels import CUDAProperties`. Import the installed one first.
_root = Path(__file__).resolve().parents[1]
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _root]
try:
    import kernels  # noqa: F401
except ImportError:
    pass
finally:
    sys.path[:] = _saved

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
