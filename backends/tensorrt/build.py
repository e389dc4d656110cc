"""Building serialized TensorRT plans: optimization profiles from kiln's profile plan (or
from ranges a caller gives for a plain module's dims), a timing cache carried from build
to build where the TensorRT at hand uses one, and the builder's phases shown as a
progress bar.

Weights are embedded in the plan. Refittable or stripped plans (``REFIT``,
``REFIT_IDENTICAL``, ``STRIP_PLAN``, or ``REFIT_INDIVIDUAL`` with weights marked
refittable) make TensorRT-RTX 1.7's builder call CUDA, so they fail without a GPU; kiln
builds plans where there is none, and does not offer them.

The builder runs without a GPU (TensorRT-RTX compiles ahead of time for its supported
GPUs); running a plan needs one. A ``Plan`` records what the network declared (its I/O
tensors, their types and each profile's shapes), because a plan's bytes cannot be
inspected without deserializing it on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from ...ir import Graph
from ...passes.profiles import DimRange
from .library import TensorRT, find_tensorrt
from ..naming import output_names
from .lower import lower
from .network import LoweringError, trt_dims

@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor of a plan: its name, kiln dtype name and dims (-1 where dynamic)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """A serialized plan and what was declared when building it."""

    data: bytes
    tensorrt: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    layers: int
    seconds: float
    timing_cache: bytes | None = None


def profile_shapes(graph: Graph, ranges: Mapping[str, DimRange | tuple[int, int, int]]
                   ) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Each graph input's (min, opt, max) shape when its symbols span ``ranges``
    (symbol name -> min / opt / max)."""
    ranges = {k: r if isinstance(r, DimRange) else DimRange(*r) for k, r in ranges.items()}
    shapes = {}
    for value in graph.inputs:
        missing = {str(s) for d in value.shape if not isinstance(d, int) for s in d.free_symbols} - set(ranges)
        if missing:
            raise LoweringError(f"input %{value.name} has dims {', '.join(sorted(missing))} that no profile "
                                "range gives")
        shapes[value.name] = tuple(
            tuple(d if isinstance(d, int) else int(d.subs({s: getattr(ranges[str(s)], end) for s in d.free_symbols}))
                  for d in value.shape)
            for end in ("min", "opt", "max"))
    return shapes


def _progress_monitor(trt: TensorRT, bar: tqdm):
    """An ``IProgressMonitor`` that advances ``bar`` over the builder's top-level phase and
    names the phase it is in."""

    class Monitor(trt.module.IProgressMonitor):
        def __init__(self):
            trt.module.IProgressMonitor.__init__(self)
            self.top: str | None = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.top = phase_name
                bar.reset(total=num_steps)
            bar.set_description(phase_name)

        def step_complete(self, phase_name, step):
            if phase_name == self.top:
                bar.update(1)
            return True

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_plan(graph: Graph, profiles: Sequence[Mapping[str, DimRange | tuple[int, int, int]]],
               trt: TensorRT | None = None, timing_cache: bytes | None = None, progress: bool = False) -> Plan:
    """Lower ``graph`` and build a serialized plan with one optimization profile per
    mapping in ``profiles`` (symbol name -> min / opt / max); ``timing_cache`` seeds the
    builder's timing cache where the TensorRT at hand uses one."""
    if not profiles:
        raise ValueError("a plan needs at least one optimization profile")
    trt = trt or find_tensorrt()
    shapes = [profile_shapes(graph, ranges) for ranges in profiles]
    start = time.perf_counter()
    nb = lower(graph, trt)
    config = nb.builder.create_builder_config()
    cache = None
    if trt.has("timing_cache"):
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, False)
    for per_input in shapes:
        profile = nb.builder.create_optimization_profile()
        for name, (low, opt, high) in per_input.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    with tqdm(desc="building the TensorRT plan", disable=not progress, leave=False) as bar:
        if progress and trt.has("progress_monitor"):
            monitor = _progress_monitor(trt, bar)  # held here until the build ends
            config.progress_monitor = monitor
        serialized = nb.builder.build_serialized_network(nb.network, config)
    if serialized is None:
        errors = "\n".join(f"  {m}" for m in nb.logger.messages if m.startswith(("ERROR", "INTERNAL_ERROR")))
        raise LoweringError(f"{trt} could not build a plan for graph @{graph.name}:\n{errors}")
    return Plan(bytes(serialized), str(trt), _specs(graph.inputs, [v.name for v in graph.inputs]),
                _specs(graph.outputs, output_names(graph)),
                tuple(shapes), nb.network.num_layers, time.perf_counter() - start,
                bytes(cache.serialize()) if cache is not None else None)


def _specs(values, names) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, v.dtype.name, trt_dims(v.shape)) for v, name in zip(values, names))
