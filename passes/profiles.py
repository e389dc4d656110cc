"""Dynamic-shape profile selection: from an engine's limits and, optionally, the expected
workload, choose the optimization profiles (min / opt / max of each dynamic dim of the
step graph) that a TensorRT engine is built with, and the decode batch sizes captured as
CUDA graphs. The cost model is in ``docs/profiles.md``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class EngineLimits:
    """What an engine must accept: sequences per step, tokens per sequence, tokens per step."""

    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    block_size: int = 16

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_seq_len, self.max_num_tokens, self.block_size) < 1:
            raise ValueError(f"engine limits must be positive: {self}")
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError(f"max_num_tokens {self.max_num_tokens} must admit a decode of every sequence "
                             f"(max_batch_size {self.max_batch_size})")


@dataclass(frozen=True)
class Workload:
    """What the engine is expected to serve, as relative frequencies: how many sequences
    decode together in a step, and how long prompts are."""

    decode_batch_sizes: Mapping[int, float] = field(default_factory=dict)
    prompt_lengths: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DimRange:
    """The min / opt / max of one dynamic dim in one profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a range for each dynamic dim of the step graph."""

    name: str
    dims: Mapping[str, DimRange]


@dataclass(frozen=True)
class ProfilePlan:
    """The profiles, the CUDA-graph batch sizes and the padding they are expected to cost."""

    profiles: tuple[Profile, ...]
    cuda_graph_batch_sizes: tuple[int, ...]
    expected_padding: float  # padded decode slots per real one, under the workload

    def bucket(self, batch: int) -> int:
        """The captured batch size a decode step of ``batch`` sequences runs at."""
        for size in self.cuda_graph_batch_sizes:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest captured size {self.cuda_graph_batch_sizes[-1]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> ProfilePlan:
        """The plan that ``asdict`` (or ``json.loads(to_json())``) gave."""
        profiles = tuple(Profile(p["name"], {k: DimRange(**r) for k, r in p["dims"].items()})
                         for p in data["profiles"])
        return cls(profiles, tuple(data["cuda_graph_batch_sizes"]), float(data["expected_padding"]))


def _typical(frequencies: Mapping[int, float], low: int, high: int, default: int) -> int:
    """The frequency-weighted median of the values in [low, high]."""
    items = sorted((v, f) for v, f in frequencies.items() if low <= v <= high and f > 0)
    if not items:
        return default
    total, seen = sum(f for _, f in items), 0.0
    for value, f in items:
        seen += f
        if seen >= total / 2:
            return value
    return items[-1][0]


def batch_buckets(frequencies: Mapping[int, float], max_batch: int, count: int) -> tuple[tuple[int, ...], float]:
    """At most ``count`` batch sizes, always including 1 (the single stream) and
    ``max_batch``, that minimize the expected padded slots per real slot when each decode
    step runs at the smallest size >= its batch.

    Exact, by dynamic programming over sizes 1..max_batch with prefix sums."""
    p = np.zeros(max_batch + 1)
    for batch, f in frequencies.items():
        if not 1 <= batch <= max_batch:
            raise ValueError(f"decode batch size {batch} is outside 1..{max_batch}")
        p[batch] += f
    if p.sum() == 0:
        p[1:] = 1.0  # no information: every batch size equally likely
    p /= p.sum()
    sizes_so_far = np.arange(max_batch + 1)
    mass, weighted = np.cumsum(p), np.cumsum(p * sizes_so_far)
    if max_batch == 1:
        return (1,), 0.0
    count = min(max(count, 2), max_batch)  # 1 and max_batch at least
    # best[k, hi]: least waste for batches 1..hi with k sizes, the largest hi; size 1 always first
    best = np.full((count + 1, max_batch + 1), np.inf)
    choice = np.zeros((count + 1, max_batch + 1), dtype=int)
    best[1, 1] = 0.0
    for k in range(2, count + 1):
        for hi in range(2, max_batch + 1):
            lo = sizes_so_far[1:hi]  # the previous size; batches lo+1..hi run at hi
            costs = best[k - 1, 1:hi] + hi * (mass[hi] - mass[lo]) - (weighted[hi] - weighted[lo])
            at = int(np.argmin(costs))
            best[k, hi], choice[k, hi] = costs[at], at + 1
    k = int(np.argmin(best[1:, max_batch])) + 1
    sizes, hi = [max_batch], max_batch
    while k > 1:
        hi = int(choice[k, hi])
        sizes.append(hi)
        k -= 1
    padding = max(0.0, float(best[:, max_batch].min()) / float((p * sizes_so_far).sum()))
    return tuple(sorted(set(sizes))), padding


def select_profiles(limits: EngineLimits, workload: Workload | None = None, max_cuda_graphs: int = 24) -> ProfilePlan:
    """Choose the profiles and CUDA-graph batch sizes for ``limits`` under ``workload``."""
    workload = workload or Workload()
    max_blocks = -(-limits.max_seq_len // limits.block_size)
    cache_blocks = limits.max_batch_size * max_blocks
    decode_opt = _typical(workload.decode_batch_sizes, 1, limits.max_batch_size, max(1, limits.max_batch_size // 2))
    prompt_opt = min(_typical(workload.prompt_lengths, 1, limits.max_seq_len, min(512, limits.max_seq_len)),
                     limits.max_num_tokens)
    context_opt = -(-min(limits.max_seq_len, prompt_opt * 2) // limits.block_size)
    shared = {"max_blocks": DimRange(1, context_opt, max_blocks),
              "num_blocks": DimRange(1, cache_blocks, cache_blocks),
              "block_size": DimRange(limits.block_size, limits.block_size, limits.block_size)}
    decode = Profile("decode", {"num_tokens": DimRange(1, decode_opt, limits.max_batch_size),
                                "num_seqs": DimRange(1, decode_opt, limits.max_batch_size),
                                "num_logits": DimRange(1, decode_opt, limits.max_batch_size), **shared})
    mixed = Profile("prefill", {"num_tokens": DimRange(1, max(prompt_opt, 1), limits.max_num_tokens),
                                "num_seqs": DimRange(1, 1, limits.max_batch_size),
                                "num_logits": DimRange(1, 1, limits.max_batch_size), **shared})
    sizes, padding = batch_buckets(workload.decode_batch_sizes, limits.max_batch_size, max_cuda_graphs)
    return ProfilePlan((decode, mixed), sizes, padding)
