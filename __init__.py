"""kiln: a compiler and runtime for large-language-model inference on NVIDIA GPUs.

Packages, in the one direction their imports go: ``ir`` (the graph IR) <- ``passes``
(pass manager, pattern rewriter, passes) <- ``frontends`` (torch.export, Hugging Face),
``backends`` (kernels) <- ``runtime`` (engines, serving) <- the API (``kiln.compile``,
``kiln.load``, ``kiln.LLM``) and ``cli``. ``testing`` holds the
hypothesis strategies users test their passes with.
"""

from . import ir, passes
from .api import LLM, compile, load
from .passes import Workload
from .runtime import CompiledModule, Engine, RequestOutput, RuntimeConfig, SamplingParams
from .version import __version__

__all__ = ["LLM", "CompiledModule", "Engine", "RequestOutput", "RuntimeConfig", "SamplingParams", "Workload",
           "__version__", "compile", "ir", "load", "passes"]
