"""Stage 4: run an exported ONNX file in onnxruntime and compare it with the PyTorch model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ticketc.errors import UserError

#: Lossless exports must match PyTorch to this relative error (max |onnx - torch| / max |torch|).
FP32_RTOL = 1e-5


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


def ort_session(path: str | os.PathLike[str]):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session of the file, after `ticketc.safe_onnx` checked it (external
    data inside its folder, declared sizes); onnxruntime's log lines are kept off stderr."""
    import onnxruntime as ort

    from ticketc.safe_onnx import check_onnx_file, session_options

    p = check_onnx_file(path)
    try:
        return ort.InferenceSession(
            str(p), session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"{path}: onnxruntime cannot load it ({_first_line(e)})") from e


def run_onnx(path: str | os.PathLike[str], inputs: list[torch.Tensor]) -> list[np.ndarray]:
    from ticketc.safe_onnx import run_options

    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise UserError(f"{path} takes {len(names)} input(s), the sample has {len(inputs)}")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    try:
        return list(session.run(None, feed, run_options()))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: onnxruntime failed on the sample ({_first_line(e)})") from e


@torch.no_grad()
def verify(
    path: str | os.PathLike[str],
    model: nn.Module,
    sample: torch.Tensor,
    tolerance: float | None,
) -> Verification:
    """Compare onnxruntime's outputs on `sample` with the PyTorch model's."""
    expected = model(sample)
    flat = list(expected) if isinstance(expected, tuple | list) else [expected]
    got = run_onnx(path, [sample])
    if len(got) != len(flat):
        raise UserError(f"{path} has {len(got)} output(s), the model has {len(flat)}")
    errors = []
    for i, (g, e) in enumerate(zip(got, flat, strict=True)):
        ref = e.detach().double().cpu().numpy()
        if g.shape != ref.shape:
            raise UserError(f"{path}: output {i} has shape {g.shape}, PyTorch gives {ref.shape}")
        diff = np.abs(g.astype(np.float64) - ref)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        errors.append(OutputError(f"output{i}", max_abs, max_abs / scale if scale > 0 else max_abs))
    return Verification(errors, tolerance, int(sample.shape[0]))


def random_sample(example: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(example.shape, generator=generator, dtype=example.dtype)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
