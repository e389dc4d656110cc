"""Sizing the paged KV cache from the device memory left after the weights."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .engine import CacheSpec


def available_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device``: the CUDA allocator's view, or the host's."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES") * size
    return int(available), int(pages * size)


class CacheLayout(NamedTuple):
    """The KV cache each rank of a parallel engine allocates: ``num_blocks`` blocks of
    ``block_size`` tokens, or, where ``num_blocks`` is 0, as many as every rank's plan
    allows (``plan_num_blocks`` with the fraction, blocks worth having and reserve here)."""

    num_blocks: int
    block_size: int
    memory_fraction: float = 0.9
    useful_blocks: int = 0
    reserve_bytes: int = 0


def plan_num_blocks(spec: CacheSpec, block_size: int, device: torch.device, memory_fraction: float,
                    max_useful_blocks: int, reserve_bytes: int = 0, sharers: int = 1) -> int:
    """How many blocks fit in ``memory_fraction`` of the device's memory, after what is
    in use already (the weights) and ``reserve_bytes`` (activations), split between
    ``sharers`` processes that each size a cache of their own in it at once; never more
    than ``max_useful_blocks`` (enough for every sequence at full length)."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    free, total = available_memory(device)
    in_use = total - free
    budget = (int(total * memory_fraction) - in_use - reserve_bytes) // sharers
    block_bytes = spec.bytes_per_token() * block_size
    blocks = min(max(budget, 0) // block_bytes, max_useful_blocks)
    if blocks < 1:
        raise MemoryError(f"no room for a KV cache on {device}: {in_use / 2**30:.1f} GiB of {total / 2**30:.1f} "
                          f"GiB in use, fraction {memory_fraction}; raise the fraction or free memory")
    return int(blocks)
