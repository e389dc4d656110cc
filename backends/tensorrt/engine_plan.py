"""The TensorRT plan of an engine: the step graph of the ``tensorrt`` pipeline built with
one optimization profile per profile that kiln's profile pass chose, stored in the
engine directory beside the graph and weights (the manifest hashes it like every file).
"""

from __future__ import annotations

from typing import Any

from ...ir import Graph
from ...passes.profiles import DimRange, ProfilePlan
from .build import Plan, TensorSpec, build_plan
from .library import TensorRT

PLAN_FILE, TIMING_CACHE_FILE = "tensorrt.plan", "tensorrt.timing_cache"
STEP_DIMS = ("num_tokens", "num_seqs", "num_logits")


def step_ranges(profiles: ProfilePlan, max_batch_size: int, max_seq_len: int) -> list[dict[str, DimRange]]:
    """The dim ranges of each profile for the linear-cache step graph: the profile's
    token and sequence counts, caches of ``max_seq_len`` tokens per slot, and up to
    ``max_batch_size`` slots (the runtime's linear cache has one slot per sequence)."""
    cache = {"max_seq_len": DimRange(max_seq_len, max_seq_len, max_seq_len),
             "num_slots": DimRange(1, max_batch_size, max_batch_size)}
    return [{**{k: v for k, v in p.dims.items() if k in STEP_DIMS}, **cache} for p in profiles.profiles]


def build_engine_plan(graph: Graph, profiles: ProfilePlan, max_batch_size: int, max_seq_len: int,
                      trt: TensorRT | None = None, timing_cache: bytes | None = None,
                      progress: bool = False) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Build the step graph's plan; return its manifest entry and the files to store."""
    plan = build_plan(graph, step_ranges(profiles, max_batch_size, max_seq_len), trt, timing_cache, progress)
    files = {PLAN_FILE: plan.data}
    if plan.timing_cache is not None:
        files[TIMING_CACHE_FILE] = plan.timing_cache
    return plan_manifest(plan, [p.name for p in profiles.profiles]), files


def plan_manifest(plan: Plan, profile_names: list[str]) -> dict[str, Any]:
    """What the manifest records of a plan: the TensorRT that built it, its I/O tensors,
    each named profile's shapes, its layer count and build time."""
    return {"tensorrt": plan.tensorrt, "plan": PLAN_FILE,
            "inputs": [_spec(t) for t in plan.inputs], "outputs": [_spec(t) for t in plan.outputs],
            "profiles": {name: {k: [list(s) for s in shapes] for k, shapes in p.items()}
                         for name, p in zip(profile_names, plan.profiles)},
            "layers": plan.layers, "build_seconds": round(plan.seconds, 3)}


def _spec(tensor: TensorSpec) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": tensor.dtype, "dims": list(tensor.dims)}
