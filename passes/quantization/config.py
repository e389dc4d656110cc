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
    "int4_gptq": "weight-only INT4 in groups, GPTQ: rounding errors compensated through calibration Hessians",
    "int4_awq": "weight-only INT4 in groups, AWQ: input channels scaled by calibration activations, ranges clipped",
    "w8a8_sq": "W8A8 INT8, SmoothQuant: activation outliers migrated into the weights (alpha), per-token INT8",
}
CALIBRATED = ("int4_gptq", "int4_awq", "w8a8_sq")  # schemes that run the model on calibration text
# option -> the schemes it applies to (beyond the options every scheme records)
SCHEME_OPTIONS = {"act_order": ("int4_gptq",), "damp": ("int4_gptq",), "clip": ("int4_awq",),
                  "alpha": ("w8a8_sq",)}


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme and its options.

    ``skip`` holds glob patterns over the layers' module paths (``"model.layers.0.*"``,
    ``"*.down_proj"``): a ``linear`` whose location matches stays in high precision.
    The LM head is quantized only with ``lm_head=True``; embedding tables never are.
    ``group_size`` and ``symmetric`` apply to the INT4 schemes; ``activations`` to ``fp8``:
    scales computed per token at run time (``dynamic``) or one per layer from calibration
    (``static``). ``act_order`` (columns by decreasing Hessian diagonal) and ``damp`` (of
    the mean diagonal) are GPTQ's; ``clip`` (AWQ's range clipping search) AWQ's; ``alpha``
    (migration strength) SmoothQuant's.
    """

    scheme: str
    group_size: int = 128
    symmetric: bool = False
    lm_head: bool = False
    skip: tuple[str, ...] = field(default=())
    activations: str = "dynamic"
    act_order: bool = False
    damp: float = 0.01
    clip: bool = True
    alpha: float = 0.5

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
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (SmoothQuant's migration strength) must be in [0, 1], got {self.alpha}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp (GPTQ's dampening, a fraction of the mean Hessian diagonal) must be in (0, 1), "
                             f"got {self.damp}")
        for option, schemes in SCHEME_OPTIONS.items():
            if self.scheme not in schemes and getattr(self, option) != self.__dataclass_fields__[option].default:
                raise ValueError(f"{option} applies to {', '.join(schemes)}, not {self.scheme}")

    @property
    def calibrated(self) -> bool:
        """Whether the scheme runs the model on calibration text."""
        return self.scheme in CALIBRATED or self.activations == "static"

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
        """The config as JSON values (the engine manifest stores it): the options every
        scheme has and those of its own scheme."""
        values = {**asdict(self), "skip": list(self.skip)}
        return {k: v for k, v in values.items() if self.scheme in SCHEME_OPTIONS.get(k, (self.scheme,))}
