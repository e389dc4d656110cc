"""GPU targets: what a target name fixes about the GPU, and whether a device is one.

An engine built for ``h100`` holds kernel configurations tuned on an H100; it refuses to
run on another GPU (TensorRT-LLM's rule). ``cuda`` is any NVIDIA GPU: the engine
records the GPU it was tuned on and refuses others the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuTarget:
    """A GPU target: the device names it accepts (empty: any), compute capability and
    whether it has FP8 tensor cores."""

    name: str
    device_names: tuple[str, ...]
    compute_capability: tuple[int, int] | None
    fp8: bool


GPU_TARGETS = {
    "cuda": GpuTarget("cuda", (), None, False),
    "h100": GpuTarget("h100", ("H100",), (9, 0), True),
    "h200": GpuTarget("h200", ("H200",), (9, 0), True),
}


class DeviceMismatchError(RuntimeError):
    """The GPU at hand is not the one an engine was built for."""


def device_name(device: torch.device | str | None = None) -> str | None:
    """The name of the CUDA device (the current one by default), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def matches(target: str, name: str) -> bool:
    """Whether a GPU called ``name`` is a ``target`` GPU."""
    accepted = GPU_TARGETS[target].device_names
    return not accepted or any(a.lower() in name.lower() for a in accepted)


def check_device(target: str, tuned_on: str | None, device: torch.device | str) -> None:
    """Refuse to run an engine built for ``target`` (tuned on GPU ``tuned_on``) on
    ``device`` when that GPU is not what it was built for."""
    name = device_name(device)
    if name is None:
        raise DeviceMismatchError(f"this engine was built for target {target!r} and needs a CUDA GPU; torch sees none")
    if not matches(target, name):
        raise DeviceMismatchError(f"this engine was built for target {target!r}; this GPU is {name}: rebuild it "
                                  f"with `kiln build --target cuda` (or the target that names this GPU) here")
    if tuned_on is not None and tuned_on != name:
        raise DeviceMismatchError(f"this engine's kernels were tuned on {tuned_on}; this GPU is {name}: rebuild "
                                  f"it here with `kiln build`")
