"""The install maps kernels/ to ticketc.kernels and lists every package."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed():
    setuptools = _declared()
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ticketc").rglob("__init__.py")
    }
    on_disk |= {"ticketc.kernels"}
    assert on_disk == set(setuptools["packages"])
    assert setuptools["package-dir"]["ticketc.kernels"] == "kernels"


def test_kernels_import_under_ticketc_only():
    module = importlib.import_module("ticketc.kernels")
    assert Path(module.__file__).parent == ROOT / "kernels"


def test_import_ticketc_does_not_import_triton_or_onnx():
    import subprocess
    import sys

    heavy = "('triton', 'onnx', 'onnxruntime')"
    code = f"import sys, ticketc; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
