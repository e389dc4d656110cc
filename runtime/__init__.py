"""The runtime: compiled artifacts (``Engine`` for causal LMs, ``CompiledModule`` for
plain modules) that run optimized graphs.

``runtime`` imports ``ir``, ``passes`` and ``frontends``.
"""

from .engine import CompiledModule, Engine, EngineInfo, Generation

__all__ = ["CompiledModule", "Engine", "EngineInfo", "Generation"]
