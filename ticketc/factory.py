"""Resolve `module.path:factory` references (architectures, models, datasets)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ticketc.errors import UserError


def resolve(ref: str, what: str = "factory") -> Callable[..., Any]:
    """Import `module.path:name` and return the callable it names."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {ref!r} is not of the form module.path:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {ref!r}: cannot import module {module_name!r} ({e})") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} {ref!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise UserError(f"{what} {ref!r} is not callable")
    return obj  # type: ignore[no-any-return]
