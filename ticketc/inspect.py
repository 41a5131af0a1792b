"""Per-layer sparsity and storage figures for a model or an ONNX file (`ticketc inspect`)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketc.errors import UserError
from ticketc.safe_load import is_pt2_archive

BLOCK_SIZES = (8, 16, 32, 64)


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    nnz: int
    density: float
    dense_bytes: int  # fp32
    csr_bytes: int
    codec_bytes: int  # compact codec, fp32 values (lossless)
    codec: str
    block_occupancy: dict[int, float]  # block size -> fraction of b x b blocks holding a nonzero


@dataclass(frozen=True)
class Inspection:
    path: str
    kind: str  # "model" | "onnx" | "compiled"
    layers: list[LayerStats]
    plan: list[dict[str, Any]] | None = None  # a compiled artifact's per-layer plan

    @property
    def totals(self) -> dict[str, float]:
        numel = sum(int(np.prod(layer.shape)) for layer in self.layers)
        nnz = sum(layer.nnz for layer in self.layers)
        return {
            "numel": numel,
            "nnz": nnz,
            "density": nnz / numel if numel else 1.0,
            "dense_bytes": sum(layer.dense_bytes for layer in self.layers),
            "csr_bytes": sum(layer.csr_bytes for layer in self.layers),
            "codec_bytes": sum(layer.codec_bytes for layer in self.layers),
        }

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "path": self.path,
            "kind": self.kind,
            "layers": [asdict(x) for x in self.layers],
            "totals": self.totals,
        }
        if self.plan is not None:
            out["plan"] = self.plan
        return out


def layer_stats(name: str, weight: torch.Tensor) -> LayerStats:
    from ticketc.formats.bsr import block_occupancy
    from ticketc.formats.compact import Compact
    from ticketc.formats.csr import CSR

    weight = weight.detach().float().cpu()
    rows = weight.shape[0] if weight.dim() else 1
    # explicit column count: reshape(rows, -1) is ambiguous for an empty (0-size) layer
    matrix = weight.reshape(rows, weight.numel() // rows if rows else 0)
    nnz = int(weight.count_nonzero())
    compact = Compact.from_dense(weight, values="fp32")
    return LayerStats(
        name=name,
        shape=tuple(weight.shape),
        nnz=nnz,
        density=nnz / max(weight.numel(), 1),
        dense_bytes=4 * weight.numel(),
        csr_bytes=CSR.from_dense(matrix).nbytes,
        codec_bytes=compact.nbytes,
        codec=f"{compact.positions_kind}+{compact.values_kind}",
        block_occupancy={b: block_occupancy(matrix, b) for b in BLOCK_SIZES},
    )


def inspect_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    mask_path: str | os.PathLike[str] | None = None,
) -> Inspection:
    from ticketc.load import load_model
    from ticketc.safe_load import check_file, looks_like_onnx, open_zip

    p = check_file(path)
    names = None
    with open(p, "rb") as f:
        if zipfile.is_zipfile(f):
            with open_zip(f, p) as archive:  # declared sizes checked before anything is read
                names = archive.namelist()
    if names is not None and is_pt2_archive(names):
        from ticketc.compile.plan import plan_rows

        plan = plan_rows(p)  # reads the zip (sizes checked above), never unpickles
        if plan is not None:  # compiled by ticketc: the sparse modules hold no dense weight
            return Inspection(str(p), "compiled", [], plan)
    elif names is None and (p.suffix == ".onnx" or looks_like_onnx(p)):
        return Inspection(str(p), "onnx", [layer_stats(n, w) for n, w in onnx_weights(p).items()])
    loaded = load_model(p, arch=arch, trust_pickle=trust_pickle, mask_path=mask_path)
    params = dict(loaded.model.named_parameters())
    return Inspection(str(p), "model", [layer_stats(n, params[n]) for n in loaded.masks])


def onnx_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weight matrices of an ONNX file as dense float32 tensors, whatever form they are
    stored in (dense or sparse initializers, ticketc's portable decode nodes).

    The file is checked first (`ticketc.safe_onnx`): external data stays in its folder, declared
    dense sizes fit in memory. Raises UserError naming the file and what is wrong.
    """
    from ticketc.safe_onnx import load_onnx

    model = load_onnx(path)
    try:
        weights = _stored_weights(model, path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy / onnx on a corrupt tensor
        raise UserError(f"{path}: corrupt tensor data ({_line(e)})") from e
    weights.update(_decode_portable(model, path))
    return {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()}


def _stored_weights(model: Any, path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    graph = model.graph
    weights: dict[str, np.ndarray] = {}
    consumers = {"Gemm", "MatMul", "Conv"}
    used_as_weight = {
        name for node in graph.node if node.op_type in consumers for name in node.input[1:2]
    }
    for init in graph.initializer:
        if init.name in used_as_weight and len(init.dims) >= 2:
            weights[init.name] = numpy_helper.to_array(init)
    for sparse in graph.sparse_initializer:
        weights[sparse.values.name] = _densify(sparse, path)
    return weights


def _densify(sparse: Any, path: Path) -> np.ndarray:
    """A SparseTensorProto as a dense array: indices linear [NNZ] or coordinates [NNZ, rank]."""
    from onnx import numpy_helper

    dims = tuple(int(d) for d in sparse.dims)
    numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64, copy=False)
    where = f"{path}: sparse initializer {sparse.values.name[:80]!r}"
    if indices.ndim == 2 and len(dims) == indices.shape[1]:
        if ((indices < 0) | (indices >= np.array(dims, dtype=np.int64))).any():
            raise UserError(f"{where} has indices outside its dims {list(dims)}")
        indices = np.ravel_multi_index(tuple(indices.T), dims) if len(indices) else indices[:, 0]
    indices = indices.reshape(-1)
    if len(indices) != len(values):
        raise UserError(f"{where} has {len(indices)} indices for {len(values)} values")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise UserError(f"{where} has indices outside its {numel} elements")
    dense = np.zeros(numel, dtype=np.float32)
    dense[indices] = values
    return dense.reshape(dims)


def _decode_portable(model: Any, path: Path) -> dict[str, np.ndarray]:
    """Run only the ticketc decode nodes of a portable file, in onnxruntime (its own log lines
    silenced); a decode that fails is a UserError naming the file."""
    import onnx
    import onnxruntime as ort

    from ticketc.safe_onnx import run_options, session_options

    nodes = [n for n in model.graph.node if n.domain == "ticketc"]
    if not nodes:
        return {}
    needed = {i for n in nodes for i in n.input}
    try:
        graph = onnx.helper.make_graph(
            nodes,
            "decode",
            [],
            [
                onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                for n in nodes
            ],
            [init for init in model.graph.initializer if init.name in needed],
        )
        decode = onnx.helper.make_model(
            graph,
            opset_imports=model.opset_import,
            functions=model.functions,
            ir_version=model.ir_version,
        )
        session = ort.InferenceSession(
            decode.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
        outputs = session.run(None, {}, run_options())
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"{path}: its compact weights do not decode ({_line(e)})") from e
    return {n.output[0]: out for n, out in zip(nodes, outputs, strict=True)}


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
