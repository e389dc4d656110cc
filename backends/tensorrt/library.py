"""Finding TensorRT at run time and probing what it offers.

kiln lowers to either NVIDIA TensorRT (module ``tensorrt``) or TensorRT-RTX (module
``tensorrt_rtx``): both expose the same ``INetworkDefinition`` API, so one code path
serves both. What differs between them and between versions (the native LLM layers,
strong typing, the progress monitor, whether a timing cache does anything) is probed on
the module found, never assumed from its name or version.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

MODULES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = ("pip install tensorrt-rtx-cu13==1.7.1.116 (module tensorrt_rtx), or NVIDIA's tensorrt "
                "(module tensorrt)")


class TensorRTUnavailableError(ImportError):
    """No TensorRT Python module can be imported, or one lacks what a build needs."""


def _has(path: str) -> Callable[[ModuleType], bool]:
    owner, _, name = path.rpartition(".")

    def probe(trt: ModuleType) -> bool:
        holder = getattr(trt, owner, None) if owner else trt
        return holder is not None and hasattr(holder, name)
    return probe


# feature -> probe over the imported module
FEATURES: dict[str, Callable[[ModuleType], bool]] = {
    "attention": _has("INetworkDefinition.add_attention_v2"),
    "kv_cache_update": _has("INetworkDefinition.add_kv_cache_update"),
    "rotary_embedding": _has("INetworkDefinition.add_rotary_embedding"),
    "normalization": _has("INetworkDefinition.add_normalization"),
    "strongly_typed": _has("NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
    "progress_monitor": _has("IProgressMonitor"),
    # TensorRT-RTX keeps the timing-cache calls but documents them as no-ops (it compiles
    # kernels when the engine first runs and caches them in its runtime cache instead).
    "timing_cache": lambda trt: _has("IBuilderConfig.create_timing_cache")(trt) and not hasattr(trt, "IRuntimeCache"),
}


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT module, its version and the features it was found to have."""

    module: ModuleType
    name: str
    version: str
    features: frozenset[str]

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise KeyError(f"unknown TensorRT feature {feature!r}; known: {', '.join(sorted(FEATURES))}")
        return feature in self.features

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def probe(module: ModuleType) -> TensorRT:
    """The features of an imported TensorRT module."""
    features = frozenset(name for name, test in FEATURES.items() if test(module))
    return TensorRT(module, module.__name__, getattr(module, "__version__", "unknown"), features)


def find_tensorrt(name: str | None = None) -> TensorRT:
    """The first TensorRT module that imports (``name`` to ask for one), probed."""
    if name is not None and name not in MODULES:
        raise ValueError(f"TensorRT module must be one of {MODULES}, got {name!r}")
    errors = []
    for candidate in (name,) if name else MODULES:
        try:
            return probe(importlib.import_module(candidate))
        except ImportError as exc:
            errors.append(f"{candidate}: {exc}")
    raise TensorRTUnavailableError(f"no TensorRT module could be imported ({'; '.join(errors)}): {INSTALL_HINT}")
