"""Backends: what runs a final graph's ops on a device.

- ``reference`` runs every op with torch (the registry's reference implementations, with
  in-place and batched versions of the ops where the runtime needs them), on the CPU or
  on a CUDA device.
- ``cuda`` (``backends/cuda/``) runs the fused ops and paged attention as Triton kernels
  and the GEMMs through cuBLAS, with launch parameters tuned at build time; it is
  imported only when a GPU runs it (it needs Triton).
- ``support`` lists what a backend's kernels cannot do yet (an attribute of an op they
  run), refused by name before an engine is built.

``backends`` imports ``ir`` and ``passes``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .reference import Kernel, reference_kernels
from .support import BackendSupportError, check_backend_support


def kernels_for(backend: str, target: str, tuned_on: str | None, device: torch.device | str,
                configs: Mapping[str, dict] | None = None) -> dict[str, Kernel]:
    """The kernels that run an engine of ``backend`` (built for ``target``, tuned on GPU
    ``tuned_on``) on ``device``: the reference kernels on the CPU; on a GPU, the CUDA
    backend's, after checking that the GPU is the one the engine was built for."""
    device = torch.device(device)
    if backend != "cuda" or device.type != "cuda":
        return reference_kernels(device)
    from .cuda.kernels import cuda_kernels
    from .cuda.targets import check_device

    check_device(target, tuned_on, device)
    return cuda_kernels(device, configs)


__all__ = ["Kernel", "BackendSupportError", "check_backend_support", "kernels_for", "reference_kernels"]
