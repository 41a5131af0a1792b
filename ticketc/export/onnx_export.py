"""Stage 3: a pruned model -> a small ONNX file that gives the same outputs.

    masks applied -> torch.onnx (dynamo) -> every initializer of the graph, as the graph holds
    it (BatchNorm folded, transposed, LSTM gates re-packed, shared weights once) -> stored
    compactly where its zeros pay -> decoded weights checked against what their value type
    promises -> outputs checked in onnxruntime against the model -> file moved into place.

The same rewrite runs on an existing ONNX file (`export_onnx_file`): the graph's initializers
are all there is to read. What decides the storage of a tensor is its values in the graph,
never a layer type or a name.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ticketc.errors import UserError
from ticketc.export.config import (
    DTYPES,
    FORMATS,
    POSITIONS,
    VALUES,
    ExportConfig,
    ExportResult,
    LayerRecord,
)
from ticketc.export.trace import batch_only, dynamic_axes, torch_to_onnx
from ticketc.export.write import ir_numpy, read_metadata, write_onnx
from ticketc.inputs import ExampleInputs, float_dtype, random_like
from ticketc.load import set_eval_
from ticketc.masks import Masks, masked_model
from ticketc.program_inputs import symbolic_axes
from ticketc.verify import (
    ROUNDING_FACTOR,
    RuntimeUnsupported,
    Verification,
    check_loads_in_a_child,
    fp32_rounding,
    ort_session,
    sample_for,
    verify,
)

__all__ = [
    "DTYPES",
    "FORMATS",
    "POSITIONS",
    "VALUES",
    "ExportConfig",
    "ExportResult",
    "LayerRecord",
    "export_model",
    "read_metadata",
]


def export_model(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any,
    out: str | os.PathLike[str],
    config: ExportConfig | None = None,
    *,
    masks: Masks | None = None,
    sample: Any = None,
    source: str | None = None,
) -> ExportResult:
    """Export a pruned model to `out`, verified; write nothing on failure.

    `model`: an nn.Module, with prune hooks, parametrizations or `masks` (parameter name ->
    bool) applied on a copy (the module passed in is not modified), or a torch.export program.
    `example_inputs`: a tensor, a tuple of tensors or a dict of name -> tensor (a batch of 1 is
    fine: the batch axis is exported dynamic). `sample`: the same, real data to verify on
    (default: random, batch 3). `source` names the model in the sparsity card written beside
    `out` (`config.card`). Raises UserError with one line naming what went wrong.
    """
    config = config or ExportConfig()
    source = source or "an in-memory model"
    start = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    notes: list[str] = []
    program_axes = symbolic_axes(model)
    if program_axes is not None and not any(program_axes.values()) and config.dynamic_batch:
        config = replace(config, dynamic_batch=False)
        notes.append(
            "the program was exported with fixed input shapes, which its guards enforce: the "
            "file keeps them (torch.export.export(..., dynamic_shapes=...) makes axes dynamic)"
        )
    prepared, _ = masked_model(model, masks)
    own = float_dtype(prepared)
    target = DTYPES[config.dtype] if config.dtype else own
    if program_axes is not None and target != own:
        raise UserError(
            f"--dtype {config.dtype}: {_fixed_dtype(own)}; export the program again from a "
            f"{config.dtype} copy of the model"
        )

    def attempt(dtype: torch.dtype, notes: list[str]) -> ExportResult:
        """`_export`, again where the dynamic axes fail: with the sequence length fixed (and a
        note) where the model has one, then with every input shape fixed."""
        model = prepared
        if dtype != own:
            model = copy.deepcopy(prepared).to(dtype)
            notes = [*notes, f"model cast to {_kind(dtype)}"]
        set_eval_(model)
        example = ExampleInputs.of(example_inputs).map(
            lambda t: t.to(dtype) if t.is_floating_point() else t
        )
        fallbacks = [replace(config, dynamic_batch=False)]
        axes = dynamic_axes(example, model)  # runs the model: once per attempt
        if config.dynamic_sequence and axes != batch_only(axes, model):
            fallbacks.insert(0, replace(config, dynamic_sequence=False))
        try:
            return _export(model, example, out, config, sample, dtype, start, notes, source, axes)
        except _DynamicAxesFail as e:
            failure = e
        for fallback in fallbacks:
            fixed = "sequence length" if fallback.dynamic_batch else "input shapes"
            note = f"{fixed} fixed at {example.describe()}: with dynamic axes, {failure}"
            try:
                return _export(
                    model,
                    example,
                    out,
                    fallback,
                    sample,
                    dtype,
                    start,
                    [*notes, note],
                    source,
                    axes,
                )
            except _DynamicAxesFail:
                continue  # the batch fails too: every shape fixed next
        raise AssertionError("an export with fixed shapes checks no other shape")

    try:
        return attempt(target, notes)
    except RuntimeUnsupported as e:
        if program_axes is not None and target != torch.float32:
            raise UserError(
                f"{e} ({_fixed_dtype(own)}: export the program again from a float32 copy of the "
                f"model, or pass --no-verify to keep {_kind(target)})"
            ) from e
        if config.dtype is not None or target == torch.float32:
            raise UserError(
                f"{e} (pass --dtype fp32, or --no-verify to keep {_kind(target)})"
            ) from e
        note = (
            f"exported in fp32: onnxruntime's CPU provider cannot run this {_kind(target)} graph "
            f"(pass --dtype {_kind(target)} --no-verify to keep {_kind(target)})"
        )
        return attempt(torch.float32, [*notes, note])


class _DynamicAxesFail(UserError):
    """The file is right at the traced shapes but not at another batch size or sequence length:
    torch.onnx kept a traced size inside the graph (a sequence-first LSTM's time axis, exported
    as the batch; an LSTM feeding a GRU, whose Reshape keeps the traced length)."""


def _kind(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _fixed_dtype(own: torch.dtype) -> str:
    """Why a torch.export program is exported in its own float type: its guards check its
    inputs' dtypes and its graph holds the dtypes it was traced in, so a cast copy cannot run."""
    return f"a torch.export program keeps the float type it was traced in ({_kind(own)})"


def _export(
    prepared: nn.Module,
    example: ExampleInputs,
    out: str | os.PathLike[str],
    config: ExportConfig,
    sample: Any,
    dtype: torch.dtype,
    start: float,
    notes: list[str],
    source: str,
    axes: dict[str | int, list[int]],
) -> ExportResult:
    """One export of `prepared` (in eval mode, of float type `dtype`) traced on `example` (of
    that type) with `axes` dynamic (`dynamic_axes`), written to `out` and checked."""
    notes = list(notes)
    reference = prepared
    if config.dead_units:
        prepared, note = _without_dead_units(prepared)
        notes.append(note)
    traced = torch_to_onnx(
        prepared,
        example,
        dynamic=config.dynamic_batch,
        sequence=config.dynamic_sequence,
        opset=config.opset,
        input_names=list(config.input_names) if config.input_names else None,
        output_names=list(config.output_names) if config.output_names else None,
        axes=axes,
    )
    notes += traced.notes
    sources = _marked_sources(traced.sources, traced.model, reference)

    late: list[str] = []  # notes the output check adds

    def within_rounding(
        path: Path, inputs: ExampleInputs, tolerance: float | None, session: Any
    ) -> Verification:
        """`verify`, where an fp32 file whose weights are exact (checked before) may differ
        from PyTorch by as much as PyTorch's own fp32 rounding, which an ill-conditioned
        network amplifies past the tolerance (torch.onnx's dense export does the same)."""
        result = verify(path, reference, inputs, tolerance, session)
        if result.passed or config.values != "fp32" or dtype != torch.float32:
            return result
        rounding = fp32_rounding(reference, inputs)
        if not 0 < result.max_rel <= ROUNDING_FACTOR * rounding:
            return result
        late.append(
            f"onnxruntime differs from PyTorch by {result.max_rel:.3g} (relative), within "
            f"{ROUNDING_FACTOR}x of PyTorch's own fp32 rounding on this sample ({rounding:.3g}, "
            "fp32 vs fp64): the network amplifies rounding; the stored weights are exact"
        )
        return Verification(result.outputs, None, result.batch)

    def check_outputs(path: Path) -> Verification:
        check_loads_in_a_child(path)
        session = ort_session(path)
        # another batch and sequence length where they are dynamic
        resized = sample_for(session, example, reference)
        dynamic = any(not isinstance(d, int) for port in session.get_inputs() for d in port.shape)
        tolerance = config.output_tolerance(str(dtype).split(".")[-1])
        # against the model as given: dead-unit removal must not change its outputs. First at
        # the traced shapes (or the user's sample), where a failure is the file's values ...
        first = (
            random_like(example, reference, padded=True)
            if sample is None
            else ExampleInputs.of(sample)
        )
        first = first.map(lambda t: t.to(dtype) if t.is_floating_point() else t)
        result = within_rounding(path, first, tolerance, session)
        if not result.passed or not dynamic:
            return result
        # ... then at another batch / sequence, where a failure is a traced size the graph kept
        try:
            other = within_rounding(path, resized, tolerance, session)
        except UserError as e:
            raise _DynamicAxesFail(str(e).replace(f"{path}: ", "")) from e
        if not other.passed:
            shapes = resized.describe()
            raise _DynamicAxesFail(f"onnxruntime differs at {shapes}: {other.summary()}")
        return other if sample is None else result

    result = write_onnx(
        traced.model, out, config, sources, notes, check_outputs, start, source=source
    )
    result.notes += late
    return result


def _marked_sources(
    sources: dict[str, list[str]], model: ir.Model, reference: nn.Module
) -> dict[str, list[str]]:
    """Sources with a "*" on a parameter whose values the exporter changed under its own name
    (BatchNorm folded into a conv weight): the data tells, not the name."""
    tensors: dict[str, torch.Tensor] = dict(reference.named_parameters(remove_duplicate=False))
    tensors.update(reference.named_buffers(remove_duplicate=False))
    marked: dict[str, list[str]] = {}
    for init, names in sources.items():
        value = model.graph.initializers[init].const_value
        out = []
        for name in names:
            same = True
            if name == init and name in tensors and value is not None:
                held = _tensor(ir_numpy(value))
                own = tensors[name].detach()
                same = held.shape == own.shape and bool(
                    torch.equal(held.to(own.dtype) if held.dtype != own.dtype else held, own)
                )
            out.append(name if same else name + "*")
        marked[init] = out
    return marked


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor of an initializer's values, bfloat16 (ml_dtypes, which torch.from_numpy
    does not take) included."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _without_dead_units(model: nn.Module) -> tuple[nn.Module, str]:
    from ticketc.transforms import eliminate_dead_units

    smaller, report = eliminate_dead_units(model)
    if not report.applied:
        return model, f"dead units kept: {report.reason}"
    note = (
        f"dead units: removed {report.removed_units} units, parameters "
        f"{report.params_before:,} -> {report.params_after:,}"
    )
    return smaller, note
