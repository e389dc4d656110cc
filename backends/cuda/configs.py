"""Launch configurations as stored in an engine's manifest: plain dicts turned back into
the kernels' frozen dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


def config_from_dict(config_type: type, fields: Mapping[str, Any]):
    """A configuration dataclass from its fields as stored (nested dataclasses too)."""
    hints = typing.get_type_hints(config_type)
    values = {}
    for f in dataclasses.fields(config_type):
        if f.name in fields:
            value = fields[f.name]
            values[f.name] = config_from_dict(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) \
                else value
    return config_type(**values)


def shape_key(n: int, k: int) -> str:
    """How a weight shape is named in the tuned configurations."""
    return f"{n}x{k}"
