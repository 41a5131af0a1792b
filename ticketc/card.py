"""The sparsity card: what an artifact stores per layer, how small it is, and what it buys where.

Written beside every artifact ticketc makes (`x.onnx` -> `x.card.md` + `x.card.json`; a packed
directory holds `sparsity.card.md` + `.json`) from plain records, so every writer (pack,
export, bench) produces the same card:

    card = Card(artifact="out/", kind="packed safetensors", source="bert-dir",
                layers=[LayerRecord(...), ...], files={"sparse.safetensors": 123456},
                reference=("dense safetensors", 654321),
                runtimes={"onnxruntime": "size only: ..."})
    write_card(card, card_stem(Path("out/")))
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ticketc.atomic import atomic_path

__all__ = [
    "Card",
    "LayerRecord",
    "card_paths",
    "card_stem",
    "export_card",
    "render_markdown",
    "size_phrase",
    "write_card",
]

CARD_VERSION = 1


@dataclass(frozen=True)
class LayerRecord:
    """One stored tensor.

    `pattern`: "dense" | "unstructured" | "N:M" | "block(BxB)" (ticketc.pack.pattern
    .sparsity_pattern). `layout`: how it is stored ("rice", "2:4", "portable gap8", "dense").
    `values`: the stored value type ("float16 (raw)", "int8", ...). Bytes: `dense_bytes` in the
    tensor's own dtype, `stored_bytes` as written, `bound_bytes` the entropy bound of that value
    type (mask entropy + nnz values). Errors of the decoded weight against the source:
    `max_abs_error` and `max_rel_error` (over max |w|), 0 when lossless. `speedup`: ticketc's
    runtime, predicted (or measured, as `speedup_basis` says) vs dense; None when unknown, with
    `speedup_note` saying why.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    pattern: str
    layout: str
    values: str
    dense_bytes: int
    stored_bytes: int
    bound_bytes: float
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    speedup: float | None = None
    speedup_basis: str = ""
    speedup_note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class Card:
    """An artifact's card. `files`: artifact file name -> bytes (all of them count).
    `reference`: (what the size is compared with, its bytes), e.g. ("dense safetensors", n).
    `runtimes`: runtime -> what this artifact gains there, one line each."""

    artifact: str
    kind: str
    source: str
    layers: list[LayerRecord]
    files: dict[str, int]
    reference: tuple[str, int] | None = None
    runtimes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, Any]:
        numel = sum(r.numel for r in self.layers)
        nnz = sum(r.nnz for r in self.layers)
        stored = sum(self.files.values())
        bound = sum(r.bound_bytes for r in self.layers)
        out: dict[str, Any] = {
            "numel": numel,
            "nnz": nnz,
            "density": nnz / numel if numel else 1.0,
            "dense_bytes": sum(r.dense_bytes for r in self.layers),
            "tensor_bytes": sum(r.stored_bytes for r in self.layers),
            "file_bytes": stored,
            "bound_bytes": bound,
            "file_bytes_over_bound": stored / bound if bound else None,
        }
        if self.reference is not None and stored:
            out["reference_bytes"] = self.reference[1]
            out["times_smaller"] = self.reference[1] / stored
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "artifact": self.artifact,
            "kind": self.kind,
            "source": self.source,
            "files": self.files,
            "reference": list(self.reference) if self.reference else None,
            "totals": self.totals,
            "runtimes": self.runtimes,
            "notes": self.notes,
            "layers": [
                {**asdict(r), "shape": list(r.shape), "density": r.density} for r in self.layers
            ],
        }


def card_stem(artifact: str | os.PathLike[str]) -> Path:
    """Where an artifact's card goes (then `stem.card.md`): `x.onnx` -> `x`; a directory `d` ->
    `d/sparsity`."""
    p = Path(artifact)
    return p / "sparsity" if p.is_dir() else p.with_suffix("")


def card_paths(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + ".card.md"), stem.with_name(stem.name + ".card.json")


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _speedup(r: LayerRecord) -> str:
    if r.speedup is None:
        return r.speedup_note or "unknown"
    text = f"{r.speedup:.2f}x" if r.speedup > 1 else "1.00x (kept dense)"
    return f"{text}, {r.speedup_basis}" if r.speedup_basis else text


def size_phrase(times_smaller: float) -> str:
    """How a file compares with its reference, from reference bytes / file bytes: "3.9x
    smaller than", "4.20x the size of" (a file larger than its reference: an EmbeddingBag's
    Loop body outweighs its weights), "about the size of" (within 5 %)."""
    if times_smaller >= 1.05:
        return f"{times_smaller:.1f}x smaller than"
    if times_smaller < 0.95:
        return f"{1 / times_smaller:.2f}x the size of"
    return "about the size of"


def render_markdown(card: Card) -> str:
    t = card.totals
    lines = [
        f"# Sparsity card: {card.artifact}",
        "",
        f"{card.kind} from `{card.source}`. {int(t['nnz']):,} of {int(t['numel']):,} weights kept "
        f"({t['density']:.2%}); files {_bytes(t['file_bytes'])}, entropy bound "
        f"{_bytes(t['bound_bytes'])}"
        + (
            f" ({t['file_bytes_over_bound']:.3f}x the bound)."
            if t["file_bytes_over_bound"]
            else "."
        ),
    ]
    if "times_smaller" in t and card.reference is not None:
        lines.append(
            f"{size_phrase(t['times_smaller']).capitalize()} the {card.reference[0]} "
            f"({_bytes(card.reference[1])})."
        )
    if card.runtimes:
        lines += ["", "## What each runtime gains", ""]
        lines += [f"- **{name}**: {text}" for name, text in card.runtimes.items()]
    lines += [
        "",
        "## Layers",
        "",
        "| tensor | shape | density | pattern | stored as | values | dense B | stored B | "
        "bound B | max abs err | max rel err | ticketc speed-up |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in card.layers:
        lines.append(
            f"| `{r.name}` | {'x'.join(map(str, r.shape))} | {r.density:.2%} | {r.pattern} | "
            f"{r.layout} | {r.values} | {r.dense_bytes:,} | {r.stored_bytes:,} | "
            f"{r.bound_bytes:,.0f} | {r.max_abs_error:.3g} | {r.max_rel_error:.3g} | "
            f"{_speedup(r)} |"
        )
    lines += ["", "## Files", ""]
    lines += [f"- `{name}`: {size:,} B" for name, size in card.files.items()]
    if card.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in card.notes]
    return "\n".join(lines) + "\n"


def write_card(card: Card, stem: Path) -> tuple[Path, Path]:
    """Write `stem.card.md` and `stem.card.json` (atomically); returns their paths."""
    md, js = card_paths(stem)
    with atomic_path(md) as tmp:
        tmp.write_text(render_markdown(card))
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(card.to_json(), indent=2, allow_nan=False) + "\n")
    return md, js


def export_card(result: Any, source: str, arrays: dict[str, Any], errors: dict[str, float]) -> Card:
    """The card of an ONNX export: `result` a ticketc.export.ExportResult (its layers: every
    float initializer of the graph as stored), `arrays` initializer -> the graph's own array
    (BatchNorm folded, as the file computes with it), `errors` initializer -> the max abs error
    of its stored values measured by decoding the file in onnxruntime (absent: kept exactly).
    Per layer: density and pattern from the array's zeros, bytes as stored, the entropy bound
    at the export's value type and the measured value error."""
    import numpy as np
    import torch

    from ticketc.pack.pattern import sparsity_pattern

    records = []
    for layer in result.layers:
        array = np.asarray(arrays[layer.initializer], dtype=np.float32)
        numel = int(array.size)
        abs_err = errors.get(layer.initializer, 0.0)
        scale = float(np.abs(array).max()) if numel else 0.0
        stored_values = layer.codec.rpartition("+")[2] if "+" in layer.codec else layer.dtype
        records.append(
            LayerRecord(
                name=layer.name,
                shape=tuple(layer.shape),
                dtype=layer.dtype,
                nnz=layer.nnz,
                pattern=sparsity_pattern(torch.from_numpy(array.copy())),
                layout=f"portable {layer.codec}" if "+" in layer.codec else layer.codec,
                values=stored_values,
                dense_bytes=4 * numel,
                stored_bytes=int(layer.nbytes),
                bound_bytes=layer.bound_bytes,
                max_abs_error=abs_err,
                max_rel_error=abs_err / scale if scale else 0.0,
                speedup_note="not planned here: see `ticketc compile` / `inspect` of a .pt2",
            )
        )
    notes = list(result.notes)
    if result.verification is not None:
        notes.insert(0, f"onnxruntime vs PyTorch: {result.verification.summary()}")
    return Card(
        artifact=Path(result.path).name,  # the card sits beside it
        kind=f"ONNX ({result.values} values)",
        source=source,
        layers=records,
        files={f.name: f.stat().st_size for f in result.files},
        reference=("graph's weights as dense fp32", result.weight_bytes)
        if result.weight_bytes
        else None,
        runtimes={
            "onnxruntime": "size only: the file decodes its weights at session creation, so "
            "memory and speed are the dense model's (smaller only where dead units were removed)",
            "ticketc runtime": "speed from sparsity: `ticketc compile` plans each layer",
        },
        notes=notes,
    )
