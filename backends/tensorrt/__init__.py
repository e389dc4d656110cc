"""The TensorRT backend: kiln graphs lowered to TensorRT networks and built into
serialized plans, with NVIDIA TensorRT (module ``tensorrt``) or TensorRT-RTX (module
``tensorrt_rtx``), whichever imports, its features probed.

- ``library.py``: finding the module and probing its features;
- ``network.py``: the network under construction and the helpers lowerings share;
- ``layers.py``, ``llm_layers.py``: the lowering of each op; ``table.py``: which op
  lowers how, and what a module must offer for it;
- ``lower.py``: graph -> ``INetworkDefinition``, unsupported ops refused by name first;
- ``build.py``: optimization profiles, timing cache, progress, the serialized plan;
- ``engine_plan.py``: an engine's plan, from the profile pass's profiles.

Plans are built here without a GPU; running them needs a GPU that the TensorRT at hand
supports (TensorRT-RTX 1.7: compute capability 8.0, 8.6, 8.9, 12.x). See docs/tensorrt.md.
``backends.tensorrt`` imports ``ir`` and ``passes``; TensorRT itself is imported only
when a network is lowered.
"""

from .build import Plan, TensorSpec, build_plan, profile_shapes
from .engine_plan import PLAN_FILE, TIMING_CACHE_FILE, build_engine_plan, step_ranges
from .library import FEATURES, TensorRT, TensorRTUnavailableError, find_tensorrt, probe
from .lower import UnsupportedOpsError, check_lowerable, lower
from .network import LoweringError
from .table import LOWERINGS, OpLowering, unlowerable

__all__ = ["FEATURES", "LOWERINGS", "LoweringError", "OpLowering", "PLAN_FILE", "Plan", "TIMING_CACHE_FILE",
           "TensorRT", "TensorRTUnavailableError", "TensorSpec", "UnsupportedOpsError", "build_engine_plan",
           "build_plan", "check_lowerable", "find_tensorrt", "lower", "probe", "profile_shapes", "step_ranges",
           "unlowerable"]
