"""Stage 4: run an exported ONNX file in onnxruntime and compare it with the PyTorch model (or,
for an ONNX file rewritten by ticketc, with the original file)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ticketc.errors import UserError, first_line
from ticketc.inputs import ExampleInputs, float_dtype, random_like
from ticketc.program_inputs import symbolic_axes
from ticketc.safe_onnx import run_options

#: Lossless fp32 exports must match PyTorch to this relative error, max|onnx - torch| / max|torch|.
FP32_RTOL = 1e-5
#: The same for graphs that compute in another type: onnxruntime and torch round differently.
OUTPUT_RTOL = {"float64": 1e-5, "float32": FP32_RTOL, "float16": 1e-2, "bfloat16": 5e-2}
#: Batch size of the verification sample where the file's batch is dynamic (the example's is
#: traced at 2), so a batch fixed by mistake shows.
VERIFY_BATCH = 3


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|


@dataclass(frozen=True)
class Verification:
    outputs: list[OutputError]
    tolerance: float | None  # None: errors are reported, never a failure
    batch: int

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_rel <= self.tolerance

    def summary(self) -> str:
        parts = [f"{o.name}: max abs {o.max_abs:.3g}, rel {o.max_rel:.3g}" for o in self.outputs]
        return "; ".join(parts)


class RuntimeUnsupported(UserError):
    """onnxruntime's CPU provider has no kernel for an operator at this type (e.g. bf16 Conv)."""


# Creates one session of the file named in argv[1] and exits: 0 whether it loads or raises
# (ort_session reports that in this process), a signal when onnxruntime itself crashes
_LOAD_IN_A_CHILD = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 4
try:
    ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
except Exception:
    pass
"""


def check_loads_in_a_child(path: str | os.PathLike[str]) -> None:
    """UserError when onnxruntime crashes the process creating a session for `path` (a
    signal, not an exception: fp16 attention with dynamic axes segfaults onnxruntime 1.32).
    The session is made first in a child process, so that ends in one line and exit 2, not
    in ticketc ending without a word and its staging file left behind. ~0.4 s."""
    import signal
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_CHILD, str(path)], capture_output=True, check=False
    )
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        raise UserError(
            f"{path}: onnxruntime crashes ({name}) creating a session for it: a fault of "
            "onnxruntime with this graph (another --dtype or opset may avoid it)"
        )


def ort_session(path: str | os.PathLike[str] | bytes):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session of a file, after `ticketc.safe_onnx` checked it (external
    data inside its folder, declared sizes), or of a model ticketc serialised itself (bytes);
    onnxruntime's log lines are kept off stderr. UserError (RuntimeUnsupported for a missing
    kernel) if it does not load."""
    import onnxruntime as ort

    from ticketc.safe_onnx import check_onnx_file, session_options

    source = path if isinstance(path, bytes) else str(check_onnx_file(path))
    try:
        return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        where = "the file" if isinstance(path, bytes) else path
        message = f"{where}: onnxruntime cannot load it ({first_line(e)})"
        if (
            "NOT_IMPLEMENTED" in str(e)
            or "Could not find an implementation" in str(e)
            or ("Type Error" in str(e) and "is invalid" in str(e))
        ):
            raise RuntimeUnsupported(message) from e
        raise UserError(message) from e


def feed(session: Any, inputs: ExampleInputs) -> dict[str, np.ndarray]:
    """onnxruntime's input dict: by name where the file's input names are the keyword inputs'
    names, else in order (positional inputs, then keyword inputs)."""
    ports = session.get_inputs()
    names = [i.name for i in ports]
    tensors = inputs.tensors()
    if len(names) != len(tensors):
        raise UserError(f"the ONNX file takes {len(names)} input(s), the sample has {len(tensors)}")
    if not inputs.args and set(names) == set(inputs.kwargs):
        tensors = [inputs.kwargs[n] for n in names]
    # a float sample takes the file's float type (an fp16 file fed from an fp32 model's sample)
    wanted = {
        "tensor(float)": torch.float32,
        "tensor(float16)": torch.float16,
        "tensor(double)": torch.float64,
        "tensor(bfloat16)": torch.bfloat16,
    }
    return {
        port.name: _numpy(
            t.to(wanted[port.type]) if t.is_floating_point() and port.type in wanted else t
        )
        for port, t in zip(ports, tensors, strict=True)
    }


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def run_onnx(path: str | os.PathLike[str], inputs: Any) -> list[np.ndarray]:
    """onnxruntime's outputs on `inputs` (a tensor, a tuple / list of tensors, a dict of name ->
    tensor or an ExampleInputs); UserError (one line) when onnxruntime fails."""
    session = ort_session(path)
    try:
        return list(session.run(None, feed(session, ExampleInputs.of(inputs)), run_options()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: onnxruntime failed on the sample ({first_line(e)})") from e


#: how far past PyTorch's own fp32 rounding (fp32 vs fp64) an fp32 file with exact weights may
#: differ from PyTorch: two fp32 implementations that sum in different orders
ROUNDING_FACTOR = 4


@torch.no_grad()
def fp32_rounding(model: nn.Module, inputs: ExampleInputs) -> float:
    """How far the fp32 `model`'s outputs on `inputs` are from the same model's in fp64: the
    largest relative error over its float outputs (0.0 when it has none or cannot run so)."""
    import copy

    flattens_like_the_export(model)
    try:
        wide = copy.deepcopy(model).double()
        exact = flat_outputs(inputs.map(lambda t: t.double() if t.is_floating_point() else t)(wide))
        got = flat_outputs(inputs(model))
    except Exception:  # noqa: BLE001 - a model that does not run in fp64 gives no estimate
        return 0.0
    worst = 0.0
    for g, e in zip(got, exact, strict=False):
        if g.is_floating_point() and e.numel() and bool(torch.isfinite(e).all()):
            scale = float(e.abs().max())
            if scale > 0:
                worst = max(worst, float((g.double() - e).abs().max()) / scale)
    return worst


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, flattened the way the export flattens them (for a
    transformers model, once `flattens_like_the_export` has registered its caches)."""
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def flattens_like_the_export(model: nn.Module) -> None:
    """Register a transformers model's cache classes as pytree nodes, as transformers' own
    exporter does when ticketc exports it (`register_cache_pytrees_for_model`), so that its
    outputs flatten to the file's: the logits, then every layer's cached keys and values.
    Without it a fresh process sees a DynamicCache as one opaque leaf, and a causal LM's
    reference has 1 output against the file's 1 + 2 x layers. Nothing for other models or a
    transformers without that exporter."""
    import sys

    if "transformers" not in sys.modules:  # a model of it would have imported it
        return
    try:
        from transformers import PreTrainedModel
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        return
    if isinstance(model, PreTrainedModel):
        register_cache_pytrees_for_model(model)


def _finite(inputs: ExampleInputs) -> ExampleInputs:
    for t in inputs.tensors():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError("the sample holds NaN or Inf: outputs compared on it prove nothing")
    return inputs


def compare(
    got: Sequence[np.ndarray], expected: Sequence[np.ndarray], names: Sequence[str]
) -> list[OutputError]:
    """Max absolute and relative error of every output; UserError if counts or shapes differ,
    or if a float output of the reference is NaN everywhere (nothing to compare with)."""
    if len(got) != len(expected):
        raise UserError(f"the ONNX file has {len(got)} output(s), the reference {len(expected)}")
    errors = []
    for name, g, e in zip(names, got, expected, strict=True):
        ref = np.asarray(e).astype(np.float64)
        if ref.size and np.isnan(ref).all():
            raise UserError(f"output {name}: the reference gives NaN everywhere on the sample")
        if g.shape != ref.shape:
            raise UserError(
                f"output {name}: onnxruntime gives {g.shape}, the reference {ref.shape}"
            )
        ref = ref.reshape(-1)  # 1-D: a 0-d output (a loss, a sum) too
        diff = np.abs(np.asarray(g).astype(np.float64).reshape(-1) - ref)
        diff[np.isnan(diff) & np.isnan(ref)] = 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 0.0
        errors.append(OutputError(name, max_abs, max_abs / scale if scale > 0 else max_abs))
    return errors


def sample_for(
    session: Any, example: ExampleInputs, model: nn.Module | None = None, seed: int = 1
) -> ExampleInputs:
    """A random sample shaped like `example`, with batch VERIFY_BATCH where the file's batch is
    dynamic, and a sequence (axis 1) one shorter where the file's sequence is (one longer
    from 2 and below: shorter never passes a model's position table); only where a
    torch.export program's `model` keeps the axis symbolic too."""
    ports = session.get_inputs()
    symbolic = [
        {axis for axis, d in enumerate(p.shape or []) if not isinstance(d, int)} for p in ports
    ]
    by_name = dict(zip([p.name for p in ports], symbolic, strict=True))
    keys: list[str | int] = [*range(len(example.args)), *example.kwargs]

    def dynamic(key: str | int, axis: int) -> bool:
        if isinstance(key, str) and key in by_name:
            return axis in by_name[key]
        position = keys.index(key)
        return position < len(symbolic) and axis in symbolic[position]

    program = symbolic_axes(model) if model is not None else None

    def size(key: str | int, axis: int, s: int) -> int:
        if program is not None and axis not in program.get(keys.index(key), []):
            return s  # a program's guards fix this size
        if axis == 0 and dynamic(key, 0):
            return VERIFY_BATCH
        if axis == 1 and dynamic(key, 1):
            return s - 1 if s > 2 else s + 1
        return s

    return random_like(example, model, seed=seed, sizes=size, padded=True)


@torch.no_grad()
def verify(
    path: str | os.PathLike[str],
    model: nn.Module,
    sample: ExampleInputs | torch.Tensor,
    tolerance: float | None,
    session: Any = None,
) -> Verification:
    """Compare onnxruntime's outputs on `sample` with the PyTorch model's; UserError when the
    sample holds NaN / Inf or the model's output is all NaN (equal NaNs prove nothing)."""
    inputs = _finite(ExampleInputs.of(sample))
    session = session or ort_session(path)  # `session`: one already open on `path`
    own = float_dtype(model)
    flattens_like_the_export(model)
    try:
        expected = flat_outputs(
            inputs.map(lambda t: t.to(own) if t.is_floating_point() else t)(model)
        )
    except Exception as e:  # noqa: BLE001 - any error of the user's model on this sample
        raise UserError(f"the PyTorch model fails on the sample ({first_line(e)})") from e
    try:
        got = list(session.run(None, feed(session, inputs), run_options()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: onnxruntime failed on the sample ({first_line(e)})") from e
    names = [o.name for o in session.get_outputs()]
    errors = compare(
        got, [_numpy(e.float() if e.dtype == torch.bfloat16 else e) for e in expected], names
    )
    return Verification(errors, tolerance, _batch(inputs))


def verify_against_onnx(
    path: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    sample: ExampleInputs,
    tolerance: float | None,
) -> Verification:
    """Compare onnxruntime's outputs on `sample` for two ONNX files (rewritten vs original)."""
    sample = _finite(sample)
    session, original = ort_session(path), ort_session(reference)
    try:
        got = list(session.run(None, feed(session, sample), run_options()))
        expected = list(original.run(None, feed(original, sample), run_options()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: onnxruntime failed on the sample ({first_line(e)})") from e
    names = [o.name for o in session.get_outputs()]
    return Verification(compare(got, expected, names), tolerance, _batch(sample))


def _batch(inputs: ExampleInputs) -> int:
    tensors = inputs.tensors()
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
