"""The runtimes a user could run a pruned model with, each prepared as a no-argument callable on
fixed inputs, or a one-line reason why it cannot run here.

    torch dense        the masked model as it is (MKL / cuBLAS)
    ticketc compiled   ticketc.compile at this batch size (the plan is shown beside it)
    ticketc .pt2       that compiled model through torch.export, saved and loaded back
                       (what `ticketc compile` writes and a deployment loads)
    onnxruntime dense  the dense ONNX export (torch.onnx) in onnxruntime's CPU provider
    torch CSR          every pruned Linear as a torch sparse CSR matmul (other layers dense)
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ticketc.errors import first_line
from ticketc.export.trace import quiet
from ticketc.inputs import ExampleInputs

TORCH_DENSE = "torch dense"
COMPILED = "ticketc compiled"
PT2 = "ticketc .pt2"
ORT = "onnxruntime dense"
TORCH_CSR = "torch CSR"
RUNTIMES = (TORCH_DENSE, COMPILED, PT2, ORT, TORCH_CSR)


@dataclass
class Prepared:
    """A runtime ready to time: `run()` computes the model's outputs on the batch's inputs."""

    run: Callable[[], Any]
    note: str = ""  # e.g. the plan, or which layers a baseline covers
    seconds: float = 0.0  # one untimed call (first call: warm-up included), set by the caller


class NotRunnable(Exception):
    """A runtime that cannot run this model here; str(e) says why (one line)."""


# --------------------------------------------------------------------------- onnxruntime


def ordered_tensors(model: nn.Module, inputs: ExampleInputs) -> list[tuple[str, Tensor]]:
    """The input tensors in the order torch.export (and so the ONNX graph) takes them: the
    forward's parameters in signature order, each flattened; names for error messages."""
    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
        items = list(bound.arguments.items())
    except (TypeError, ValueError):
        items = [(f"arg{i}", a) for i, a in enumerate(inputs.args)] + list(inputs.kwargs.items())
    out = []
    for name, value in items:
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]
        out += [(name if len(leaves) == 1 else f"{name}.{i}", t) for i, t in enumerate(leaves)]
    return out


class OnnxDense:
    """The model's dense ONNX export, once, with a dynamic batch dimension where it traces
    (then one session serves every batch size), else re-exported per batch size."""

    def __init__(self, model: nn.Module, workdir: Path, threads: int) -> None:
        self.model, self.workdir, self.threads = model, workdir, threads
        self.dynamic: Any = None  # a session whose batch dimension is free
        self.files: list[Path] = []

    def export(self, inputs: ExampleInputs, tag: str, dynamic: bool) -> tuple[Any, list[Path]]:
        import onnxruntime as ort

        from ticketc.compile.program import export_program

        path = self.workdir / f"dense_{tag}.onnx"
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            if dynamic:
                program = export_program(self.model, inputs)
            else:
                program = torch.export.export(self.model, inputs.args, inputs.kwargs)
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
            assert onnx_program is not None
            onnx_program.save(str(path), external_data=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        files = sorted(p for p in self.workdir.iterdir() if p.name.startswith(path.name))
        return session, files

    def prepare(self, inputs: ExampleInputs) -> Prepared:
        """A callable running onnxruntime on `inputs` (raises NotRunnable with the reason)."""
        try:
            if self.dynamic is None:
                self.dynamic, self.files = self.export(inputs, "dynamic", dynamic=True)
            session = self.dynamic
            if not _accepts(session, inputs, self.model):
                session, _ = self.export(inputs, f"b{inputs.batch}", dynamic=False)
        except NotRunnable:
            raise
        except Exception as e:  # noqa: BLE001 - torch.onnx and onnxruntime raise many types
            raise NotRunnable(f"dense ONNX export failed: {first_line(e, 200)}") from e
        names = [i.name for i in session.get_inputs()]
        tensors = [t for _, t in ordered_tensors(self.model, inputs)]
        if len(names) != len(tensors):
            raise NotRunnable(
                f"the ONNX graph takes {len(names)} inputs, the model call has {len(tensors)}"
            )
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        return Prepared(lambda: session.run(None, feed), "dense export, CPUExecutionProvider")


def _accepts(session: Any, inputs: ExampleInputs, model: nn.Module) -> bool:
    tensors = [t for _, t in ordered_tensors(model, inputs)]
    specs = session.get_inputs()
    if len(specs) != len(tensors):
        return False
    for spec, t in zip(specs, tensors, strict=True):
        dims = spec.shape
        if len(dims) != t.dim():
            return False
        if any(isinstance(d, int) and d != s for d, s in zip(dims, t.shape, strict=True)):
            return False
    return True


def onnx_outputs(result: list[np.ndarray]) -> list[Tensor]:
    return [torch.from_numpy(np.asarray(r)) for r in result]


# --------------------------------------------------------------------------- torch CSR


class TorchCSRLinear(nn.Module):
    """A pruned nn.Linear run as torch's own sparse CSR matmul (MKL on CPU, cuSPARSE on CUDA);
    x [..., in_features] -> [..., out_features], fp32."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore")
            self.weight_csr = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def torch_csr(model: nn.Module) -> tuple[nn.Module, int, int]:
    """A copy of `model` with every Linear whose weight has zeros as TorchCSRLinear; returns
    (copy, layers replaced, Linear layers in all). Raises NotRunnable when none has zeros."""
    out = copy.deepcopy(model)
    linears = [(n, m) for n, m in out.named_modules() if type(m) is nn.Linear]
    pruned = [(n, m) for n, m in linears if bool((m.weight == 0).any())]
    if not pruned:
        raise NotRunnable(
            "no pruned nn.Linear layer (torch's CSR matmul replaces Linear layers only)"
            if linears
            else "the model has no nn.Linear layer (torch's CSR matmul replaces Linear only)"
        )
    for name, layer in pruned:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, TorchCSRLinear(layer))
    return out, len(pruned), len(linears)
