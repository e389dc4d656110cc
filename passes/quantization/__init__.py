"""Quantization: the ``quantize`` stage and what it needs.

- ``config``: ``QuantConfig``, a scheme and its options (skip list, LM head, INT4 groups);
- ``weights``: round-to-nearest weight quantizers (INT8, INT4, FP8);
- ``stage``: the pass that rewrites ``linear`` into the scheme's quantized op;
- ``fusion``: the QKV, gate/up and logits-selection rewrites for quantized linears;
- ``activation_fusion``: the norms that feed W8A8 layers emit their quantized activations;
- ``calibration``: static FP8 input scales from runs on sample text;
- ``calibrated``: the calibrated schemes (GPTQ, AWQ, SmoothQuant), with ``activations``
  (input statistics), ``gptq``, ``awq`` and ``smoothing`` (scales folded into the ops
  that make the inputs);
- ``kv_cache``: the pass that gives the paged step graph E4M3 key and value caches.

The quantized ops themselves, with their reference implementations, are declared in
``ir/opdefs/quantized.py`` and ``ir/opdefs/quantized_activations.py``. Like every pass
module, this imports only ``ir`` and ``passes``.
"""

from .activation_fusion import ACTIVATION_QUANT_RULES
from .calibration import calibrate_fp8_inputs, default_corpus
from .config import CALIBRATED, SCHEMES, QuantConfig
from .fusion import QUANTIZED_FUSION_RULES, QUANTIZED_SELECTION_RULES
from .kv_cache import fp8_kv_cache
from .stage import lm_heads, quantize_linears, quantize_pass

__all__ = ["ACTIVATION_QUANT_RULES", "CALIBRATED", "QUANTIZED_FUSION_RULES", "QUANTIZED_SELECTION_RULES", "QuantConfig",
           "SCHEMES", "calibrate_fp8_inputs", "default_corpus", "fp8_kv_cache", "lm_heads", "quantize_linears", "quantize_pass"]
