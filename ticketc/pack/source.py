"""What `ticketc pack` reads: a Hugging Face directory, a safetensors file, or any model file.

Every source yields (source file, tensor name, tensor) one at a time and says how its weights
were laid out, so `unpack` can write the same files back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketc.errors import UserError

__all__ = ["Source", "open_source"]


@dataclass
class Source:
    """kind: "hf" (a directory), "safetensors" (one file) or "model" (any file load_model reads).

    `files`: source weight files in order; `file_metadata(file)` their safetensors metadata.
    `config`: config.json as it should read beside the packed weights (None without one).
    `extra_files`: paths relative to `directory` to copy beside the packed weights.
    `aliases`: tensor name -> the name of the tensor it shares storage with (stored once).
    `module_types`: parameter name -> owning module's class name, when the model is known.
    """

    kind: str
    path: Path
    files: list[str]
    tensors: Callable[[], Iterator[tuple[str, str, torch.Tensor]]]
    file_metadata: Callable[[str], dict[str, str]]
    config: dict[str, Any] | None = None
    directory: Path | None = None
    extra_files: list[Path] = field(default_factory=list)
    index_metadata: dict[str, Any] | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    module_types: Callable[[], dict[str, str]] | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def weight_bytes(self) -> int | None:
        """Bytes of the source weight files on disk (None for in-memory models)."""
        if self.kind == "model":
            return None
        base = self.directory if self.directory is not None else self.path.parent
        return sum((base / f).stat().st_size for f in self.files)


def open_source(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    mask_path: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> Source:
    """The source behind MODEL; UserError when it cannot be read (see ticketc.hf, ticketc.load)."""
    p = Path(path)
    if p.is_dir():
        return _hf_source(p, trust_remote_code=trust_remote_code)
    if p.suffix == ".safetensors" and arch is None:
        return _safetensors_source(p)
    return _model_source(p, arch=arch, trust_pickle=trust_pickle, mask_path=mask_path)


def _hf_source(p: Path, *, trust_remote_code: bool) -> Source:
    from ticketc.hf import open_checkpoint

    checkpoint = open_checkpoint(p, trust_remote_code=trust_remote_code)
    kind = "dense safetensors" if checkpoint.file_kind == "safetensors" else "pytorch_model.bin"
    notes = []
    if checkpoint.legacy is not None and checkpoint.legacy.format != "dense":
        kind = f"compressed-tensors {checkpoint.legacy.format} safetensors"
        notes.append(
            f"read compressed-tensors {checkpoint.legacy.format} weights "
            f"({checkpoint.legacy.where}); config.json is written without it"
        )
    return Source(
        kind="hf",
        path=p,
        files=list(checkpoint.files),
        tensors=checkpoint.tensors,
        file_metadata=checkpoint.file_metadata,
        config=checkpoint.dense_config,
        directory=p,
        extra_files=checkpoint.extra_files(),
        index_metadata=checkpoint.index_metadata,
        module_types=lambda: _hf_module_types(checkpoint),
        description=kind,
        notes=notes,
    )


def _hf_module_types(checkpoint: Any) -> dict[str, str]:
    """Parameter name -> module class, from the model built on the meta device (no weights)."""
    from ticketc.hf.model import load_config, meta_model, model_class

    trust = checkpoint.trust_remote_code
    config = load_config(checkpoint.path, checkpoint.dense_config, trust_remote_code=trust)
    cls = model_class(checkpoint.path, config, checkpoint.dense_config, trust_remote_code=trust)
    return _module_types(meta_model(cls, config))


def _module_types(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            out[full] = type(module).__name__
    return out


def _safetensors_source(p: Path) -> Source:
    from ticketc.hf.checkpoint import safetensors_file

    if not p.is_file():
        raise UserError(f"{p}: no such file")

    def tensors() -> Iterator[tuple[str, str, torch.Tensor]]:
        with safetensors_file(p) as f:
            names = f.keys()
            for name in names:
                yield p.name, name, f.get_tensor(name)

    def metadata(_: str) -> dict[str, str]:
        with safetensors_file(p) as f:
            return dict(f.metadata() or {})

    return Source(
        kind="safetensors",
        path=p,
        files=[p.name],
        tensors=tensors,
        file_metadata=metadata,
        description="safetensors file",
    )


def _model_source(
    p: Path, *, arch: str | None, trust_pickle: bool, mask_path: str | os.PathLike[str] | None
) -> Source:
    from ticketc.load import load_model

    loaded = load_model(p, arch=arch, trust_pickle=trust_pickle, mask_path=mask_path)
    state = loaded.model.state_dict()
    canonical: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    aliases: dict[str, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if tensor.numel() and key in canonical and tensor.is_contiguous():
            aliases[name] = canonical[key]
        else:
            canonical.setdefault(key, name)
            unique[name] = tensor.detach()
    file = "model.safetensors"

    def tensors() -> Iterator[tuple[str, str, torch.Tensor]]:
        for name, tensor in unique.items():
            yield file, name, tensor

    return Source(
        kind="model",
        path=p,
        files=[file],
        tensors=tensors,
        file_metadata=lambda _: {"format": "pt"},
        aliases=aliases,
        module_types=lambda: _module_types(loaded.model),
        description=f"{loaded.source} {p.name}",
        notes=list(loaded.notes),
    )


def copy_extras(source_dir: Path, names: list[Path], dst: Path, skip: set[str]) -> None:
    """Copy the files `names` (relative to `source_dir`, except those in `skip`) into `dst`:
    what a model directory holds besides its weights (tokenizer, generation config)."""
    for rel in names:
        if str(rel) in skip:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / rel, dst / rel)


def write_json(path: Path, obj: Any) -> None:
    """`obj` as sorted, indented JSON (config.json, index files of an output directory)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
