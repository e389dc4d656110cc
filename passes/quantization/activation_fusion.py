"""Activation quantization fused into the norm that makes the activation (TensorRT-LLM's
norm-quant fusion): ``rms_norm`` or ``add_rms_norm`` followed by a W8A8 layer that
quantizes its input per token at run time (``linear_fp8`` without a static input scale,
``linear_w8a8``) becomes ``rms_norm_quant`` or ``add_rms_norm_quant``, which emits the
E4M3 or INT8 codes and their per-token scales, and ``scaled_linear`` over them
(``ir/opdefs/quantized_activations.py``). The activation is then written once, in 8 bits,
and no kernel quantizes it apart.

A norm fuses only where the quantized layer is its output's one user, so these rules
come after the QKV and gate/up fusions have made one GEMM of the layers a norm feeds
(the pipeline runs them last, after ``select_logits``, so that a quantized LM head has
been narrowed to the selected rows first). The result is the same bits: the fused ops'
references are the unfused ones composed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir import DType, dtypes, ops
from ..rewriter import Rule
from .fusion import signature


@dataclass(frozen=True)
class Consumer:
    """A W8A8 layer that quantizes its own input per token into ``qdtype``."""

    op: str
    qdtype: DType

    def call(self, x, qweight, weight_scale, bias):
        static_scale = [None] if self.op == "linear_fp8" else []  # dynamic scales only
        return ops.call(self.op, x, qweight, weight_scale, *static_scale, bias)


CONSUMERS = (Consumer("linear_fp8", dtypes.float8_e4m3fn), Consumer("linear_w8a8", dtypes.int8))
NORM_INPUTS = {"rms_norm": ("x", "weight"), "add_rms_norm": ("x", "residual", "weight")}  # norm -> its operands


def _rule(consumer: Consumer, norm: str, biased: bool) -> Rule:
    inputs = NORM_INPUTS[norm]
    names = [*inputs, "qweight", "weight_scale", *(["bias"] if biased else [])]
    with_sum = norm == "add_rms_norm"

    def pattern(eps, **v):
        results = ops.call(norm, *(v[n] for n in inputs), eps=eps)
        normed = results[0] if with_sum else results
        out = consumer.call(normed, v["qweight"], v["weight_scale"], v.get("bias"))
        return (out, results[1]) if with_sum else out

    def replacement(eps, **v):
        results = ops.call(f"{norm}_quant", *(v[n] for n in inputs), eps=eps, qdtype=consumer.qdtype)
        out = ops.scaled_linear(results[0], results[1], v["qweight"], v["weight_scale"], v.get("bias"),
                                dtype=v["x"].type.dtype)
        return (out, results[2]) if with_sum else out

    label = f"{norm}_quant_{consumer.op}" + ("_bias" if biased else "")
    return Rule(signature(pattern, names, ("eps",)), signature(replacement, names, ("eps",)), name=label)


ACTIVATION_QUANT_RULES = [_rule(consumer, norm, biased) for consumer in CONSUMERS for norm in NORM_INPUTS
                          for biased in (False, True)]
