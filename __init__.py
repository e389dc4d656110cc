"""kiln: a compiler and runtime for large-language-model inference on NVIDIA GPUs.

Packages, in the one direction their imports go: ``ir`` (the graph IR) <- ``passes``
(pass manager, pattern rewriter, passes) <- ``frontends`` (torch.export, Hugging Face)
<- ``runtime`` (engines) <- the API (``kiln.compile``) and ``cli``. ``testing`` holds the
hypothesis strategies users test their passes with.
"""

from . import ir, passes
from .api import compile
from .passes import Workload
from .runtime import CompiledModule, Engine

__version__ = "0.1.0"

__all__ = ["CompiledModule", "Engine", "Workload", "compile", "ir", "passes", "__version__"]
