"""Backends: what runs a final graph's ops on a device. ``reference`` runs every op with
torch (the registry's reference implementations, with in-place and batched versions of
the ops where the runtime needs them), on the CPU or on a CUDA device.

``backends`` imports ``ir`` and ``passes``.
"""

from .reference import reference_kernels

__all__ = ["reference_kernels"]
