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


# Tests over a few seconds on 2 busy cores that files owned by other work in progress do not
# mark themselves (test ids, or prefixes of them): they run in the full suite, not in the fast
# subset `pytest -m "not slow"`. Tests written since are marked @pytest.mark.slow in place.
SLOW = (
    "tests/test_kernels.py::",  # the Triton interpreter: ~25 s
    "tests/test_export.py::test_lossless_formats_match_torch[portable-conv1d]",
    "tests/test_export.py::test_lossless_formats_match_torch[sparse-initializer-conv",
    "tests/test_export.py::test_lossless_formats_match_torch[dense-",
    "tests/test_export.py::test_portable_fp32_weights_are_bit_exact[conv",
    "tests/test_export.py::test_lossy_values_are_close_and_smaller[fp16]",
    "tests/test_export.py::test_lossy_values_are_close_and_smaller[int8]",
    "tests/test_export.py::test_a_dense_layer_is_never_stored_bigger",
    "tests/test_export.py::test_dead_units_shrink_the_file_and_keep_outputs",
    "tests/test_export.py::test_metadata_records_version_and_layers",
    "tests/test_find_run.py::test_resume_gives_the_same_ticket",
    "tests/test_find_run.py::test_cli_find_and_report",
    "tests/test_compile.py::test_lenet300_every_format_matches_dense",
    "tests/test_compile.py::test_conv_nets_match_dense",
    "tests/test_csr_cpu.py::test_chain_matches_float64[widths2",
    "tests/test_csr_cpu.py::test_chain_matches_float64[widths3",
    # Numba compiles a kernel per signature on first use (~10-25 s each with a cold cache, as
    # in a fresh clone): the batch >= 32 chain kernels are left to the full suite.
    "tests/test_csr_cpu.py::test_chain_matches_float64",
    "tests/test_csr_cpu.py::test_chain_of_empty_and_full_layers_without_bias",
    "tests/test_csr_cpu.py::test_matmul_t_matches_float64",
    "tests/test_compile.py::test_planned_compile_matches_dense_and_leaves_input_alone[64]",
    "tests/test_compile.py::test_relu_after_a_sparse_linear_is_fused_and_names_are_kept[40]",
    "tests/test_compile.py::test_sparse_conv_pt2_round_trip",
    "tests/test_fuzz.py::",  # mutants through every reader
    "tests/test_find_run.py::test_levels_masks_rewind_and_zeros",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
