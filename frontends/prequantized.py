"""Checkpoints that ship quantized: ``quantization_config`` in config.json selects the format.

- ``gptq`` (AutoGPTQ, GPTQModel): ``qweight`` int32 ``[in * bits / 32, out]``, 32/bits codes
  packed along the input dim (lowest bits first); ``qzeros`` int32 ``[groups, out * bits / 32]``
  packed along the output dim; ``scales`` ``[groups, out]``; ``g_idx`` ``[in]``, each input
  feature's group. ``w[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``. The v1
  layout (``checkpoint_format: gptq``) stores each zero point minus one, v2 (``gptq_v2``) the
  zero point itself. 4 bits become ``linear_int4`` (groups as stored); 8 bits become
  ``linear_int8`` with one scale per channel and group and codes ``q - 128``, with
  ``sym: true`` checked to have every zero point 128, otherwise with f32 zero points
  ``zero - 128``.
  Activation order (a ``g_idx`` that is not ``i // group_size``, from ``desc_act``) is served
  exactly: the weight's input columns are sorted by group and the layer gathers its input's
  features in the same order (``QuantizedLinear.permutation``).
- ``awq`` (AutoAWQ's GEMM version): ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32
  ``[groups, out / 8]``, both packed along the output dim with nibble ``k`` holding output
  ``8 * j + [0, 2, 4, 6, 1, 3, 5, 7][k]``; ``scales`` ``[groups, out]``; zero points as stored.
- ``fp8`` (vLLM's, AutoFP8's and transformers' FP8 configs): an E4M3 ``weight``, a
  ``weight_scale`` per tensor (a scalar or ``[1]``) or per output channel (``[out]`` or
  ``[out, 1]``), and with ``activation_scheme: static`` a scalar ``input_scale``; they become
  ``linear_fp8``. ``dynamic`` activations are scaled per token at run time.
- ``compressed-tensors`` (llm-compressor) with ``format: float-quantized``: the same
  tensors, the scheme read from its one config group (8-bit float weights per tensor or
  channel; activations dynamic, or static per tensor).

Each quantized layer is found from its tensors (``*.qweight``, or an E4M3 ``*.weight`` with a
``*.weight_scale``), so layers a checkpoint left in high precision load as they are. A
config kiln cannot serve is refused with the field and value named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..ir import LazyData, TensorType, dtypes
from ..passes.quantization.weights import pack_int4_codes
from .checkpoint import TensorRef
from .errors import FrontendError
from .quantized_linear import QuantizedLinear, QuantizedRef

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each nibble of an AWQ int32 holds, in nibble order
_AWQ_NIBBLE = tuple(AWQ_ORDER.index(k) for k in range(8))  # the nibble that holds each output


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-wide codes of an int32 tensor, ``32 / bits`` a word packed along ``dim``
    (lowest bits first), as int32 with ``dim`` that many times longer."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:
        codes = packed[:, None, :] >> shifts[None, :, None]
    else:
        codes = packed[:, :, None] >> shifts[None, None, :]
    return (codes & ((1 << bits) - 1)).flatten(dim, dim + 1)


def _config_dict(config: Any) -> dict[str, Any] | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None or isinstance(qc, Mapping):
        return None if qc is None else dict(qc)
    return qc.to_dict()


def _refuse(field: str, value: Any, why: str) -> FrontendError:
    return FrontendError(f"cannot serve this checkpoint's quantization_config: {field}: {value!r} ({why})")


def _lazy(ref: TensorRef, transform: Callable[[torch.Tensor], torch.Tensor]) -> LazyData:
    return LazyData(lambda: transform(ref.load()), ref.describe)


def _groups_of(g_idx: torch.Tensor | None, in_features: int, groups: int, where: str) -> torch.Tensor | None:
    """The permutation that makes each group's input features contiguous, or None where they are already."""
    if in_features % groups:
        raise FrontendError(f"{where}: {groups} groups do not divide {in_features} input features")
    size = in_features // groups
    trivial = torch.arange(in_features) // size
    if g_idx is None or torch.equal(g_idx.long(), trivial):
        return None
    if g_idx.shape != (in_features,) or not torch.equal(torch.bincount(g_idx.long(), minlength=groups),
                                                        torch.full((groups,), size)):
        raise FrontendError(f"{where}: g_idx does not give each of the {groups} groups {size} input features")
    return torch.argsort(g_idx.long(), stable=True)


def _gptq_linear(refs: dict[str, TensorRef], bits: int, sym: bool, zero_offset: int,
                 dtype: torch.dtype) -> QuantizedLinear:
    qweight, qzeros, scales = refs["qweight"], refs["qzeros"], refs["scales"]
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    g_idx = refs["g_idx"].load() if "g_idx" in refs else None
    order = _groups_of(g_idx, in_features, groups, qweight.describe)

    def codes() -> torch.Tensor:
        q = unpack_int32(qweight.load(), bits, dim=0).T
        return q if order is None else q[:, order]

    def zeros() -> torch.Tensor:
        return (unpack_int32(qzeros.load(), bits, dim=1)[:, :out_features] + zero_offset).T.contiguous()

    grouped = TensorType(dtypes.dtype(dtype), (out_features, groups))
    if bits == 4:
        return QuantizedLinear("linear_int4", (
            ("qweight", TensorType(dtypes.uint8, (out_features, in_features // 2)),
             LazyData(lambda: pack_int4_codes(codes()), qweight.describe)),
            ("scales", grouped, _lazy(scales, lambda s: s.T.contiguous().to(dtype))),
            ("zeros", TensorType(dtypes.uint8, grouped.shape), LazyData(lambda: zeros().to(torch.uint8),
                                                                        qzeros.describe))), order)

    def signed_codes() -> torch.Tensor:
        if sym and not bool((zeros() == 128).all()):
            raise FrontendError(f"{qzeros.describe}: an 8-bit GPTQ layer with sym: true has zero points other "
                                "than 128")
        return (codes() - 128).to(torch.int8).contiguous()

    operands = [
        ("qweight", TensorType(dtypes.int8, (out_features, in_features)), LazyData(signed_codes, qweight.describe)),
        ("scale", TensorType(dtypes.float32, grouped.shape), _lazy(scales, lambda s: s.T.float().contiguous()))]
    if not sym:
        operands.append(("zeros", TensorType(dtypes.float32, grouped.shape),
                         LazyData(lambda: (zeros() - 128).float(), qzeros.describe)))
    return QuantizedLinear("linear_int8", tuple(operands), order)


def _awq_linear(refs: dict[str, TensorRef], dtype: torch.dtype) -> QuantizedLinear:
    qweight, qzeros, scales = refs["qweight"], refs["qzeros"], refs["scales"]
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    _groups_of(None, in_features, groups, qweight.describe)

    def in_output_order(packed: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_int32(packed, 4, dim=1)
        return nibbles.view(nibbles.shape[0], -1, 8)[:, :, list(_AWQ_NIBBLE)].flatten(1).T.contiguous()

    grouped = (out_features, groups)
    return QuantizedLinear("linear_int4", (
        ("qweight", TensorType(dtypes.uint8, (out_features, in_features // 2)),
         _lazy(qweight, lambda q: pack_int4_codes(in_output_order(q)))),
        ("scales", TensorType(dtypes.dtype(dtype), grouped), _lazy(scales, lambda s: s.T.contiguous().to(dtype))),
        ("zeros", TensorType(dtypes.uint8, grouped), _lazy(qzeros, lambda z: in_output_order(z).to(torch.uint8)))))


def _fp8_linear(refs: dict[str, TensorRef], static: bool, name: str) -> QuantizedLinear:
    weight, scale = refs["weight"], refs["weight_scale"]
    out_features = weight.shape[0]
    if scale.shape not in ((), (1,), (out_features,), (out_features, 1)):
        raise FrontendError(f"{scale.describe} has shape {list(scale.shape)}: kiln reads FP8 weight scales per "
                            f"tensor ([] or [1]) or per output channel ([{out_features}] or [{out_features}, 1])")
    input_scale = None
    if static:
        ref = refs.get("input_scale")
        if ref is None or ref.shape not in ((), (1,)):
            found = "none" if ref is None else f"shape {list(ref.shape)}"
            raise FrontendError(f"{name}: static activations need a scalar input_scale, found {found}")
        input_scale = LazyData(lambda: ref.load(torch.float32).reshape(()), ref.describe)
    return QuantizedLinear("linear_fp8", (
        ("qweight", TensorType(dtypes.float8_e4m3fn, weight.shape), LazyData(weight.load, weight.describe)),
        ("weight_scale", TensorType(dtypes.float32, (out_features,)),
         _lazy(scale, lambda s: s.float().reshape(-1).expand(out_features).contiguous())),
        ("input_scale", TensorType(dtypes.float32, ()), input_scale)))


def _modules(tensors: Mapping[str, TensorRef], marker: str) -> dict[str, dict[str, TensorRef]]:
    """The tensors of each module that has a ``marker`` tensor, by suffix."""
    prefixes = [key[:-len(marker)] for key in tensors if key.endswith(marker)]
    return {p: {key[len(p) + 1:]: ref for key, ref in tensors.items()
                if key.startswith(p + ".") and "." not in key[len(p) + 1:]} for p in prefixes}


def _gptq(qc: dict[str, Any], tensors: Mapping[str, TensorRef]) -> tuple[dict[str, Any], dict[str, QuantizedRef]]:
    bits, sym = qc.get("bits", 4), qc.get("sym", True)
    layout = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if bits not in (4, 8):
        raise _refuse("bits", bits, "kiln serves 4-bit and 8-bit GPTQ")
    if layout not in ("gptq", "gptq_v2"):
        raise _refuse("checkpoint_format", layout, "kiln reads the gptq (v1) and gptq_v2 layouts")
    offset = 1 if layout == "gptq" else 0
    scheme = {"method": "gptq", "bits": bits, "group_size": qc.get("group_size", 128), "sym": sym,
              "desc_act": bool(qc.get("desc_act", False)), "checkpoint_format": layout}
    refs = {}
    for prefix, parts in _modules(tensors, ".qweight").items():
        _require(parts, ("qweight", "qzeros", "scales"), prefix)
        out_features, in_features = parts["qweight"].shape[1], parts["qweight"].shape[0] * 32 // bits
        refs[prefix + ".weight"] = QuantizedRef(
            (out_features, in_features), parts["qweight"].where, f"GPTQ {prefix} ({parts['qweight'].where})",
            lambda dtype, parts=parts: _gptq_linear(parts, bits, sym, offset, dtype))
    return scheme, refs


def _awq(qc: dict[str, Any], tensors: Mapping[str, TensorRef]) -> tuple[dict[str, Any], dict[str, QuantizedRef]]:
    bits, version = qc.get("bits", qc.get("w_bit", 4)), str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise _refuse("bits", bits, "AWQ checkpoints are served with 4 bits")
    if version != "gemm":
        raise _refuse("version", qc.get("version"), "kiln reads AutoAWQ's GEMM layout")
    if not qc.get("zero_point", True):
        raise _refuse("zero_point", qc.get("zero_point"), "kiln reads AWQ checkpoints with zero points")
    scheme = {"method": "awq", "bits": 4, "group_size": qc.get("group_size", qc.get("q_group_size", 128)),
              "version": "gemm"}
    refs = {}
    for prefix, parts in _modules(tensors, ".qweight").items():
        _require(parts, ("qweight", "qzeros", "scales"), prefix)
        refs[prefix + ".weight"] = QuantizedRef(
            (parts["qweight"].shape[1] * 8, parts["qweight"].shape[0]), parts["qweight"].where,
            f"AWQ {prefix} ({parts['qweight'].where})", lambda dtype, parts=parts: _awq_linear(parts, dtype))
    return scheme, refs


def _fp8(qc: dict[str, Any], tensors: Mapping[str, TensorRef]) -> tuple[dict[str, Any], dict[str, QuantizedRef]]:
    activations = qc.get("activation_scheme", "dynamic")
    if activations not in ("dynamic", "static"):
        raise _refuse("activation_scheme", activations, "kiln reads 'dynamic' and 'static'")
    if qc.get("weight_block_size") is not None:
        raise _refuse("weight_block_size", qc["weight_block_size"],
                      "block-wise FP8 scales are not served; kiln reads per-tensor and per-channel scales")
    return {"method": "fp8", "activation_scheme": activations}, _fp8_refs(tensors, activations == "static")


def _compressed_tensors(qc: dict[str, Any], tensors: Mapping[str, TensorRef]
                        ) -> tuple[dict[str, Any], dict[str, QuantizedRef]]:
    """llm-compressor's FP8 W8A8 (``format: float-quantized``): one config group of 8-bit
    float weights per tensor or channel, activations per token (dynamic) or per tensor."""
    if qc.get("format") != "float-quantized":
        raise _refuse("format", qc.get("format"), "kiln reads compressed-tensors' float-quantized (FP8) checkpoints")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", sorted(groups), "kiln reads one config group")
    name, group = next(iter(groups.items()))
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    for field, value, allowed in (("weights.num_bits", weights.get("num_bits"), (8,)),
                                  ("weights.type", weights.get("type"), ("float",)),
                                  ("weights.strategy", weights.get("strategy"), ("tensor", "channel")),
                                  ("input_activations", inputs and inputs.get("num_bits"), (8,))):
        if value not in allowed:
            raise _refuse(f"config_groups.{name}.{field}", value, f"kiln reads {', '.join(map(str, allowed))}")
    static = not inputs.get("dynamic", False)
    if static and inputs.get("strategy") != "tensor":
        raise _refuse(f"config_groups.{name}.input_activations.strategy", inputs.get("strategy"),
                      "static input scales are read per tensor")
    scheme = {"method": "compressed-tensors", "weights": weights["strategy"],
              "activations": "static" if static else "dynamic"}
    return scheme, _fp8_refs(tensors, static)


def _fp8_refs(tensors: Mapping[str, TensorRef], static: bool) -> dict[str, QuantizedRef]:
    refs = {}
    for prefix, parts in _modules(tensors, ".weight_scale").items():
        _require(parts, ("weight", "weight_scale"), prefix)
        if parts["weight"].dtype != torch.float8_e4m3fn:
            raise FrontendError(f"{parts['weight'].describe} has dtype {parts['weight'].dtype}; an FP8 layer "
                                "needs an F8_E4M3 weight")
        refs[prefix + ".weight"] = QuantizedRef(
            parts["weight"].shape, parts["weight"].where, f"FP8 {prefix} ({parts['weight'].where})",
            lambda dtype, parts=parts, prefix=prefix: _fp8_linear(parts, static, prefix))
    return refs


def _require(parts: Mapping[str, TensorRef], names: tuple[str, ...], prefix: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise FrontendError(f"quantized layer {prefix} has no {', '.join(missing)} tensor")


FORMATS = {"gptq": _gptq, "awq": _awq, "fp8": _fp8, "compressed-tensors": _compressed_tensors}


def prequantized_tensors(config: Any, tensors: Mapping[str, TensorRef]
                         ) -> tuple[dict[str, TensorRef | QuantizedRef], dict[str, Any] | None]:
    """The checkpoint's tensors with each quantized layer's weight as a ``QuantizedRef``, and
    the checkpoint's scheme (None for a checkpoint that is not quantized)."""
    qc = _config_dict(config)
    if qc is None:
        return dict(tensors), None
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise _refuse("quant_method", method, f"kiln reads {', '.join(FORMATS)}")
    scheme, refs = FORMATS[method](qc, tensors)
    if not refs:
        raise FrontendError(f"the checkpoint's quantization_config says {method}, but no tensor is in its layout")
    return {**tensors, **refs}, scheme
