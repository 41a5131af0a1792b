"""Per-layer sparsity and storage figures for a model or an ONNX file (`ticketc inspect`)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketc.errors import UserError, first_line
from ticketc.safe_load import is_pt2_archive

BLOCK_SIZES = (8, 16, 32, 64)


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    nnz: int
    density: float
    dense_bytes: int  # fp32
    csr_bytes: int  # CSR as the CPU runtime stores it (ticketc.formats.csr: int32 indices)
    codec_bytes: int  # compact codec, fp32 values (lossless)
    codec: str
    block_occupancy: dict[int, float]  # block size -> fraction of b x b blocks holding a nonzero
    # the PyTorch parameter(s) behind an ONNX initializer of another name, from the file's
    # metadata ("mix.weight" for torch.onnx's "val_0"; a trailing "*": values rewritten,
    # e.g. a BatchNorm folded in); "" when unknown or the initializer's own name
    source: str = ""


@dataclass(frozen=True)
class Inspection:
    path: str
    kind: str  # "model" | "onnx" | "compiled" | "hf" (a Hugging Face directory's tensors)
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
    from ticketc.formats.csr import CSR, index_dtype_for

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
        csr_bytes=CSR.from_dense(matrix, index_dtype=index_dtype_for("cpu")).nbytes,
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

    if Path(path).is_dir():  # a Hugging Face directory: its stored matrices, no model built
        from ticketc.hf import open_checkpoint

        # Only tensors are read (safetensors, or torch files with weights_only), so no code
        # from the directory can run: its auto_map does not matter here.
        state = open_checkpoint(path, trust_remote_code=True).state_dict()
        layers = [layer_stats(n, t) for n, t in state.items() if t.dim() >= 2]
        return Inspection(str(path), "hf", layers)
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
        return Inspection(str(p), "onnx", onnx_layers(p))
    loaded = load_model(p, arch=arch, trust_pickle=trust_pickle, mask_path=mask_path)
    params = dict(loaded.model.named_parameters())
    return Inspection(str(p), "model", [layer_stats(n, params[n]) for n in loaded.masks])


def _stats(
    name: str, mask: torch.Tensor, nnz: int, itemsize: int, codec: str, nbytes: int
) -> LayerStats:
    """Stats of a stored tensor from its positions (`mask`), its stored form and bytes."""
    stats = layer_stats(name, mask.float())
    numel = mask.numel()
    return LayerStats(
        name=name,
        shape=tuple(mask.shape),
        nnz=nnz,
        density=nnz / max(numel, 1),
        dense_bytes=itemsize * numel,
        csr_bytes=stats.csr_bytes,
        codec_bytes=nbytes,
        codec=codec,
        block_occupancy=stats.block_occupancy,
    )


def onnx_layers(path: Path) -> list[LayerStats]:
    """Every weight of an ONNX file as it is stored: ticketc's compact groups (codec, bytes and
    nnz read from their streams: positions, and the codes of dense-stored values), ONNX sparse
    initializers, all-zero constants and plain float initializers of rank >= 2."""
    from ticketc.export.onnx_in import load_onnx

    model = load_onnx(path)
    try:
        return _onnx_layers(model, path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy / onnx on a corrupt tensor or stream
        raise UserError(f"{path}: corrupt tensor data ({first_line(e)})") from e


def _onnx_layers(model: Any, path: Path) -> list[LayerStats]:
    import onnx
    from onnx import numpy_helper

    from ticketc.export.portable_read import read_portable
    from ticketc.export.write import read_metadata

    meta = read_metadata(model) or {}
    layers: list[LayerStats] = []
    stored: set[str] = set()
    try:
        groups = read_portable(model, dict(meta.get("groups") or {}))
    except ValueError as e:
        raise UserError(f"{path}: its ticketc streams are malformed ({e})") from e
    for group in groups:
        c = group.compact
        index = c.linear_indices()
        nnz, shares = c.nnz(), c.nbytes_per_tensor()
        itemsize = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}[group.out_kind]
        head = len(c.shapes) - c.dense_tail  # tensors after it store no positions
        for t, (name, shape) in enumerate(zip(group.names, c.shapes, strict=True)):
            codec = f"{'dense' if t >= head else c.positions_kind}+{c.values_kind}"
            start, numel = int(c.offsets[t]), int(np.prod(shape))
            mask = np.zeros(numel, dtype=bool)
            mine = index[(index >= start) & (index < start + numel)] - start
            mask[mine] = True
            tensor = torch.from_numpy(mask.reshape(shape))
            layers.append(_stats(name, tensor, int(nnz[t]), itemsize, codec, round(shares[t])))
            stored.update(group.names)
    for sparse in model.graph.sparse_initializer:
        dense = _densify(sparse, path)  # indices checked against the dims first
        indices = numpy_helper.to_array(sparse.indices)
        values = numpy_helper.to_array(sparse.values)
        nbytes = indices.nbytes + values.nbytes
        tensor = torch.from_numpy(np.asarray(dense != 0))
        name = sparse.values.name
        layers.append(_stats(name, tensor, values.size, values.itemsize, "coo-int64", nbytes))
        stored.add(name)
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.output[0] in (meta.get("layers") or {}):
            dims = [i for i in model.graph.initializer if i.name == node.input[0]]
            if dims:
                shape = tuple(int(d) for d in numpy_helper.to_array(dims[0]))
                zeros = torch.zeros(shape, dtype=torch.bool)
                layers.append(_stats(node.output[0], zeros, 0, 4, "zeros", 0))
                stored.add(node.output[0])
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    floats.add(onnx.TensorProto.BFLOAT16)
    for init in model.graph.initializer:
        if init.name in stored or init.data_type not in floats or len(init.dims) < 2:
            continue
        array = numpy_helper.to_array(init)
        nonzero = torch.from_numpy(np.asarray(array != 0))
        kind, nbytes = str(array.dtype), array.nbytes
        count = int(nonzero.sum())
        layers.append(_stats(init.name, nonzero, count, array.itemsize, f"dense {kind}", nbytes))
    sources = dict(meta.get("layers") or {})
    return [replace(x, source=_source(x.name, sources.get(x.name))) for x in layers]


def _source(name: str, entry: object) -> str:
    """The PyTorch names of a metadata "layers" entry ("" = the initializer's own name,
    "*" = it, values rewritten; else a comma list), "" when they say no more than `name`."""
    if not isinstance(entry, str) or entry == "":
        return ""
    return name + "*" if entry == "*" else entry


def decoded_weights(path: Path) -> dict[str, np.ndarray]:
    """The compactly stored weights of a ticketc ONNX file, decoded by onnxruntime (bf16 as
    float32), keyed by initializer name."""
    from ticketc.export.decode import decode_in_onnxruntime
    from ticketc.export.onnx_in import load_onnx
    from ticketc.export.portable_read import read_portable
    from ticketc.export.write import read_metadata

    model = load_onnx(path)
    try:
        groups = read_portable(model, dict((read_metadata(model) or {}).get("groups") or {}))
        names = [name for group in groups for name in group.names]
        return decode_in_onnxruntime(model, names) if names else {}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed streams, onnxruntime's own errors
        raise UserError(f"{path}: its compact weights do not decode ({first_line(e)})") from e


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
