"""What a user asks the ``quantize`` stage for: a scheme and its options."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# scheme -> what it does (the names DESIGN.md gives)
SCHEMES = {
    "int8": "weight-only INT8, round-to-nearest, one scale per output channel",
    "int4": "weight-only INT4, round-to-nearest, groups of group_size input features (symmetric or asymmetric)",
    "fp8": "W8A8 FP8 (E4M3): weights scaled per output channel, activations per token at run time",
}


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme and its options.

    ``skip`` holds glob patterns over the layers' module paths (``"model.layers.0.*"``,
    ``"*.down_proj"``): a ``linear`` whose location matches stays in high precision.
    The LM head is quantized only with ``lm_head=True``; embedding tables never are.
    ``group_size`` and ``symmetric`` apply to ``int4``; ``activations`` to ``fp8``: scales
    computed per token at run time (``dynamic``) or one per layer from calibration
    (``static``).
    """

    scheme: str
    group_size: int = 128
    symmetric: bool = False
    lm_head: bool = False
    skip: tuple[str, ...] = field(default=())
    activations: str = "dynamic"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {self.scheme!r}; kiln quantizes with "
                             + ", ".join(f"{name} ({doc})" for name, doc in SCHEMES.items()))
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        if isinstance(self.skip, str):
            raise ValueError(f"skip takes a list of layer patterns, got the string {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.activations not in ("dynamic", "static"):
            raise ValueError(f"activations must be 'dynamic' or 'static', got {self.activations!r}")
        if self.activations == "static" and self.scheme != "fp8":
            raise ValueError(f"static activation scales are calibrated for fp8 only, not {self.scheme}")

    @classmethod
    def of(cls, spec: str | QuantConfig | Mapping[str, Any]) -> QuantConfig:
        """A config from a scheme name, a config, or the dict that ``to_dict`` made."""
        if isinstance(spec, QuantConfig):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown quantization options {sorted(unknown)}")
            return cls(**spec)
        raise TypeError(f"quantization takes a scheme name or a QuantConfig, got {type(spec).__name__}")

    def skips(self, location: str | None) -> bool:
        """Whether the layer at ``location`` stays in high precision."""
        return location is not None and any(fnmatch.fnmatchcase(location, p) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values (the engine manifest stores it)."""
        return {**asdict(self), "skip": list(self.skip)}
