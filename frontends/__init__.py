"""Frontends: bring models into kiln's IR. ``torch_export`` imports an ExportedProgram
(through ``aten``, the one table that knows ATen ops, and ``complex``, which holds complex
tensors as real pairs); ``modules`` compiles plain ``nn.Module``s; ``huggingface`` loads
checkpoint directories of decoder models (with ``config_checks`` refusing config values by
name, ``longrope`` for PhiMoE's rotary, ``prequantized`` for GPTQ, AWQ and FP8 checkpoints,
kept in their bits through ``quantized_linear``); ``gguf`` loads llama.cpp files; ``onnx`` imports ONNX models
(through ``onnx_ops``, the one table that knows ONNX ops).

``frontends`` imports ``ir`` and ``passes``.
"""

from .errors import FrontendError, UnsupportedOpsError
from .torch_export import import_program

__all__ = ["FrontendError", "UnsupportedOpsError", "import_program"]
