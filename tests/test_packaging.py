"""Packaging: every package listed, kernels under ticketc only, imports from one checkout."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
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
    assert on_disk == set(setuptools["packages"])  # type: ignore[arg-type]
    assert "package-dir" not in setuptools  # a mapping serves a package from one checkout


def test_no_top_level_kernels_package():
    """Hugging Face's `kernels` (a transformers dependency) owns that import name: a folder of
    that name at the root would shadow it whenever the root is on sys.path (pytest, python -m)."""
    assert not (ROOT / "kernels").exists()
    module = importlib.import_module("ticketc.kernels")
    assert Path(module.__file__).parent == ROOT / "ticketc" / "kernels"


def test_a_second_checkout_imports_its_own_code(tmp_path):
    """Run from another checkout (here: a copy of this one), every ticketc module, kernels
    included, comes from that checkout, not from wherever ticketc is installed (editable)."""
    other = tmp_path / "checkout"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "ticketc", other / "ticketc", ignore=skip)
    code = (
        "import ticketc, ticketc.kernels, ticketc.kernels.csr_cpu, ticketc.pack, sys; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('ticketc') and getattr(m, '__file__', None)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=other, capture_output=True, text=True, check=True
    )
    files = done.stdout.split()
    assert any(f.endswith("csr_cpu.py") for f in files)
    assert all(Path(f).is_relative_to(other) for f in files), files


def test_import_ticketc_does_not_import_triton_or_onnx():
    heavy = "('triton', 'onnx', 'onnxruntime')"
    code = f"import sys, ticketc; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
