"""kiln: a compiler and runtime for large-language-model inference on NVIDIA GPUs.

Packages, in the one direction their imports go: ``ir`` (the graph IR) <- ``passes``
(pass manager, pattern rewriter, passes) <- ``testing`` (hypothesis strategies for
users' pass tests) <- ``cli``.
"""

from . import ir, passes

__version__ = "0.1.0"

__all__ = ["ir", "passes", "__version__"]
