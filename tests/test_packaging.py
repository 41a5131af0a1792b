"""Packaging: every package listed, kernels under ticketc only, imports from one checkout."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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


@pytest.mark.slow
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


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_imported_library_is_declared():
    """Each third-party module ticketc imports is a declared dependency; Triton only in the gpu
    extra and transformers only in hf (a CPU install stays lean), nothing declared unused."""
    import ast
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    required = _requirement_names(project["dependencies"])
    modules = set()
    for path in (ROOT / "ticketc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"ticketc"}
    distributions = packages_distributions()
    imported = {distributions[m][0].lower() for m in modules}
    optional = {"triton": "gpu", "transformers": "hf"}
    for name in imported:
        if name in optional:
            assert name not in required and name in _requirement_names(extras[optional[name]])
        else:
            assert name in required, f"{name} is imported by ticketc but not a dependency"
    # declared but never imported: only what torch.onnx needs at run time
    assert required - imported <= {"onnxscript"}, required - imported


@pytest.mark.slow
def test_without_triton_the_cpu_path_runs_and_triton_tests_skip():
    """As on `pip install ticketc` (no gpu extra): compile and run a pruned model on the CPU,
    and the Triton interpreter tests skip instead of failing."""
    env = {**os.environ, "TICKETC_WITHOUT_TRITON": "1"}
    code = """
import sys
sys.modules["triton"] = None
import torch, ticketc
from tests.models_for_tests import prune_random_, tiny_mlp
model = tiny_mlp().eval()
prune_random_(model, 0.2)
fast = ticketc.compile_model(model)
x = torch.randn(4, 20)
torch.testing.assert_close(fast(x), model(x))
try:
    from ticketc.kernels import csr_linear
except ImportError as e:
    print(e)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'ticketc[gpu]'" in done.stdout
    tests = ["tests/test_kernels.py", "tests/test_kernels_compile.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    # every test of both files skipped at import: pytest's "no tests ran" (5), not a failure
    assert done.returncode == 5, done.stdout[-2000:]
    assert "2 skipped" in done.stdout and "could not import 'triton'" in done.stdout


@pytest.mark.slow
def test_triton_kernels_import_as_functions():
    pytest.importorskip("triton")
    code = (
        "from ticketc.kernels import bsr_linear, csr_linear, tiled_linear; "
        "import ticketc.kernels as k; "
        "print(all(callable(f) and not hasattr(f, '__path__') and f.__class__.__name__ == "
        "'function' for f in (bsr_linear, csr_linear, tiled_linear, k.csr_linear)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
