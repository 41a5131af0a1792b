"""A plan is data: per layer, the chosen format, what each candidate was predicted (and measured)
to cost, and why. Written as JSON beside a compiled artifact and embedded in it; a user may edit
the formats and pass the file back with `--plan`.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ticketc.compile.costs import parse_format
from ticketc.errors import UserError
from ticketc.safe_load import ZIP_ERRORS

FORMAT = "ticketc.plan"
VERSION = 2  # 2: chains, threads and the measured check; version 1 files still read
ARCHIVE_NAME = "ticketc_plan.json"  # name of the plan inside a .pt2 archive (extra files)
_MAX_PLAN_BYTES = 16 * 2**20  # plans are kilobytes; a larger declared entry is not read


@dataclass(frozen=True)
class LayerPlan:
    name: str  # module path in the model, e.g. "1" or "features.0"
    kind: str  # "linear" | "conv"
    shape: tuple[int, ...]  # weight shape
    gemm: tuple[int, int, int]  # (N, K, M) at the planned batch size
    density: float
    format: str  # "dense" | "csr" | "bsr(B)" | "tiled"
    predicted_us: dict[str, float] = field(default_factory=dict)
    measured_us: dict[str, float] | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["gemm"] = list(self.shape), list(self.gemm)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerPlan:
        return cls(
            name=str(d["name"]),
            kind=str(d.get("kind", "linear")),
            shape=tuple(int(s) for s in d.get("shape", ())),
            gemm=tuple(int(s) for s in d.get("gemm", (0, 0, 0))),  # type: ignore[arg-type]
            density=float(d.get("density", 1.0)),
            format=str(d["format"]),
            predicted_us={str(k): float(v) for k, v in (d.get("predicted_us") or {}).items()},
            measured_us=(
                None
                if d.get("measured_us") is None
                else {str(k): float(v) for k, v in d["measured_us"].items()}
            ),
            reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True)
class ChainPlan:
    """Consecutive csr Linear layers run as one kernel call (CsrSequential)."""

    layers: tuple[str, ...]
    predicted_us: float
    measured_us: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "predicted_us": self.predicted_us,
                "measured_us": self.measured_us}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChainPlan:
        measured = d.get("measured_us")
        return cls(
            tuple(str(n) for n in d["layers"]),
            float(d["predicted_us"]),
            None if measured is None else float(measured),
        )


@dataclass(frozen=True)
class Plan:
    """Per layer the chosen format and why, the chains, and (after `ticketc.compile` checked
    it) the whole compiled model measured against dense at the planned batch size."""

    device: str
    dtype: str
    batch_size: int
    cost_model: str
    layers: tuple[LayerPlan, ...]
    dead_units: dict[str, Any] | None = None  # DeadUnitReport.to_dict() when the pass ran
    chains: tuple[ChainPlan, ...] = ()
    threads: int | None = None  # torch threads the plan was made (and measured) for
    check: dict[str, Any] | None = None  # see ticketc.compile.check.check_speed

    def layer(self, name: str) -> LayerPlan | None:
        return next((lp for lp in self.layers if lp.name == name), None)

    @property
    def predicted_dense_us(self) -> float:
        """Predicted microseconds of every planned layer run dense."""
        return sum(lp.predicted_us.get("dense", 0.0) for lp in self.layers)

    @property
    def predicted_us(self) -> float:
        """Predicted microseconds of the planned layers as compiled: each chain once, the
        other layers in their format. The one total every printed prediction comes from."""
        chained = {name for chain in self.chains for name in chain.layers}
        alone = sum(
            lp.predicted_us.get(lp.format, 0.0) for lp in self.layers if lp.name not in chained
        )
        return alone + sum(chain.predicted_us for chain in self.chains)

    @property
    def sparse_layers(self) -> list[str]:
        return [lp.name for lp in self.layers if lp.format != "dense"]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "cost_model": self.cost_model,
            "predicted_us": round(self.predicted_us, 3),
            "predicted_dense_us": round(self.predicted_dense_us, 3),
            "check": self.check,
            "dead_units": self.dead_units,
            "chains": [c.to_json() for c in self.chains],
            "layers": [lp.to_json() for lp in self.layers],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a ticketc plan (format {d.get('format')!r})")
        if d.get("version") not in (1, VERSION):
            raise ValueError(f"plan version {d.get('version')!r} is not 1 or {VERSION}")
        threads = d.get("threads")
        return cls(
            device=str(d["device"]),
            dtype=str(d["dtype"]),
            batch_size=int(d["batch_size"]),
            cost_model=str(d.get("cost_model", "")),
            layers=tuple(LayerPlan.from_json(x) for x in d["layers"]),
            dead_units=d.get("dead_units"),
            chains=tuple(ChainPlan.from_json(c) for c in d.get("chains") or ()),
            threads=None if threads is None else int(threads),
            check=d.get("check"),
        )


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan JSON file (or the plan embedded in a compiled .pt2); bad files -> UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan {p}: no such file")
    text = _embedded_plan(p) if zipfile.is_zipfile(p) else p.read_text(errors="replace")
    if text is None:
        raise UserError(f"plan {p}: the archive holds no ticketc plan")
    try:
        return Plan.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"plan {p}: not a valid ticketc plan ({str(e)[:200]})") from e


def apply_overrides(plan: Plan, overrides: Plan, source: str) -> Plan:
    """Take each layer's format from `overrides`; layers it does not name keep their choice."""
    known = {lp.name for lp in plan.layers}
    unknown = [lp.name for lp in overrides.layers if lp.name not in known]
    if unknown:
        raise UserError(
            f"plan {source} names layers the model does not have: {', '.join(unknown)} "
            f"(layers: {', '.join(sorted(known))})"
        )
    chosen = {lp.name: lp.format for lp in overrides.layers}
    layers = []
    for lp in plan.layers:
        fmt = chosen.get(lp.name)
        if fmt is None or fmt == lp.format:
            layers.append(lp)
            continue
        try:
            parse_format(fmt)
        except ValueError as e:
            raise UserError(f"plan {source}, layer {lp.name}: {e}") from e
        layers.append(replace(lp, format=fmt, reason=f"set by {source}"))
    csr = {lp.name for lp in layers if lp.format == "csr"}
    chains = tuple(c for c in plan.chains if set(c.layers) <= csr)
    return replace(plan, layers=tuple(layers), chains=chains)


def _embedded_plan(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(f"/extra/{ARCHIVE_NAME}") or name == ARCHIVE_NAME:
                    if z.getinfo(name).file_size > _MAX_PLAN_BYTES:  # a zip bomb, not a plan
                        return None
                    return z.read(name).decode("utf-8", errors="replace")
    except ZIP_ERRORS:
        return None
    return None


def plan_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The per-layer plan of a compiled artifact (.pt2), or None if it holds no ticketc plan.

    Reads the zip directly, so it neither unpickles nor needs the custom ops. Each row is the
    JSON of a LayerPlan: name, kind, shape, gemm, density, format, predicted_us, measured_us,
    reason.
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return None
    text = _embedded_plan(p)
    if text is None:
        return None
    try:
        return [lp.to_json() for lp in Plan.from_json(json.loads(text)).layers]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
