"""The runtime: engines (build, save, load), the paged KV cache's block manager, the
scheduler, the sampler, the serving loop, the ``LLM`` API and the OpenAI-compatible
server.

``runtime`` imports ``ir``, ``passes``, ``frontends`` and ``backends``.
"""

from .engine import CacheSpec, CompiledModule, Engine, EngineInfo, load_engine
from .engine_files import EngineLoadError
from .llm import LLM
from .llm_engine import LLMEngine, RuntimeConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["CacheSpec", "CompiledModule", "Engine", "EngineInfo", "EngineLoadError", "LLM", "LLMEngine",
           "RequestOutput", "RuntimeConfig", "SamplingParams", "load_engine"]
