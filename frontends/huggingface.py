"""Hugging Face decoder models into kiln graphs.

A checkpoint directory is read offline (``checkpoint.py``); its model is built with its
parameters on the meta device (buffers such as rotary frequencies are computed for
real), exported with dynamic batch and sequence through kiln's attention, and imported.
Weights are lazy constants that read their tensor from safetensors when first needed,
cast to the engine's dtype. An in-memory ``PreTrainedModel`` is exported the same way,
its own tensors as the weights. Nothing here is architecture-specific.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..ir import ConstantData, Graph, LazyData, MissingData
from .attention import register_with_transformers
from .checkpoint import read_checkpoint
from .config_checks import check_config
from .errors import FrontendError
from .experts import register_with_transformers as register_experts
from .longrope import static_longrope
from .prequantized import prequantized_tensors
from .quantized_linear import QuantizedRef, use_quantized_weights
from .torch_export import import_program
from .weight_map import model_tensors

PREFIX = "model."  # the attribute under which _Logits holds the model


@dataclass
class ImportedLM:
    """A causal LM as kiln sees it: the graph (token ids [batch, seq] -> logits
    [batch, seq, vocab]), its tokenizer, its transformers config and weight dtype, and the
    quantization its checkpoint came in (None for plain weights)."""

    graph: Graph
    tokenizer: Any
    config: Any
    dtype: torch.dtype
    quantization: dict[str, Any] | None = None


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers on the CPU."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def resolve_dtype(dtype: str | torch.dtype | None, config: Any) -> torch.dtype:
    """The engine's weight dtype: ``dtype`` as given, else the config's, else float32."""
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FrontendError(f"dtype must be a floating-point dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return dtype


def build_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The transformers causal LM of ``config``, its parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    architectures = getattr(config, "architectures", None) or []
    check_config(config)
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=_attention_for(config),
                                                     experts_implementation=register_experts())
    except (ValueError, KeyError) as exc:
        raise FrontendError(f"unsupported architecture {architectures or config.model_type!r}: "
                            f"transformers has no causal LM for it ({exc})") from None
    return model.eval()


def _writes_attention_out(model_class: type | None) -> bool:
    """Whether the model computes attention itself rather than through transformers'
    attention interface (BLOOM, MPT, Falcon)."""
    return model_class is not None and not model_class._can_set_attn_implementation()


def _attention_for(config: Any) -> str:
    """kiln's attention for models that call transformers' attention interface; the eager
    one for models that write attention out themselves, whose causal mask then stays a
    graph for the raise stage to recognize (kiln's mask function builds none, which such
    a model would take as no mask at all)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if _writes_attention_out(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)):
        return "eager"
    return register_with_transformers()


def _export(model: nn.Module, max_batch_size: int, max_seq_len: int, device: str) -> torch.export.ExportedProgram:
    example = torch.zeros(2, 8, dtype=torch.long, device=device)
    # The ranges must hold the example's sizes; the engine's own limits are the runtime's to enforce.
    # Below the model's context length: MPT slices its ALiBi table of that length, which export
    # cannot trace for every length up to and including it.
    seq_max = max(min(max_seq_len, _context_length(model.config) - 1), 8)
    dims = {0: Dim("batch", max=max(max_batch_size, 2)), 1: Dim("seq", min=1, max=seq_max)}
    with torch.no_grad(), static_longrope(model, max_seq_len):
        return torch.export.export(_Logits(model), (example,), dynamic_shapes=(dims,), strict=False)


def _context_length(config: Any) -> int:
    """The longest sequence the model's config declares (unbounded if it names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return 2 ** 31


def _checkpoint_buffers_on_meta(model: nn.Module, tensors: dict[str, Any]) -> None:
    """Move the persistent buffers that the checkpoint holds (DeepSeek's router correction
    bias) to the meta device, beside the parameters: they are weights, read lazily."""
    for name, buffer in list(model.named_buffers()):
        if name in tensors and buffer.device.type != "meta":
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, buffer.to("meta"))


def _weight_source(tensors: dict[str, Any], model: nn.Module, problems: list[str]):
    """The constant source for ``import_program``: lazy checkpoint tensors, cast to the
    dtype the model was exported in (quantized ones kept in their bits); module buffers
    where the checkpoint has none. What does not fit is appended to ``problems``."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(model.config, "tie_word_embeddings", False):
        tied = {}
    buffers = dict(model.named_buffers())

    def source(name: str, fake: torch.Tensor) -> ConstantData:
        ref = tensors.get(name) or tensors.get(tied.get(name, ""))
        if ref is None:
            if name in buffers and buffers[name].device.type != "meta":
                buffer = buffers[name]
                return LazyData(lambda: buffer, f"buffer {name}")
            problems.append(f"missing tensor {name} {list(fake.shape)}")
            return MissingData(name)
        if ref.shape != tuple(fake.shape):
            problems.append(f"tensor {name} is {list(ref.shape)} in {ref.where}, the model needs {list(fake.shape)}")
        elif not (ref.dtype.is_floating_point or ref.dtype == fake.dtype):
            problems.append(f"tensor {name} has dtype {ref.dtype}, the model needs {fake.dtype}")
        target = fake.dtype
        if isinstance(ref, QuantizedRef):
            return ref.constant(target)
        return LazyData(lambda: ref.load(target), ref.describe)

    return source


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None, max_batch_size: int = 256,
                    max_seq_len: int = 8192) -> ImportedLM:
    """Import the causal LM in checkpoint directory ``path``."""
    checkpoint = read_checkpoint(path)
    tensors, quantization = prequantized_tensors(checkpoint.config, checkpoint.tensors)
    dtype = resolve_dtype(dtype, checkpoint.config)
    model = build_model(checkpoint.config, dtype)
    tensors = model_tensors(dataclasses.replace(checkpoint, tensors=tensors), model)
    graph = import_weights(model, tensors, max_batch_size, max_seq_len, str(checkpoint.path))
    return ImportedLM(graph, checkpoint.tokenizer, checkpoint.config, dtype, quantization)


def import_weights(model: nn.Module, tensors: dict[str, Any], max_batch_size: int, max_seq_len: int,
                   where: str) -> Graph:
    """Export ``model`` (built on the meta device) and import it with ``tensors`` (checkpoint
    references by parameter name) as its weights; quantized ones become quantized linears."""
    _checkpoint_buffers_on_meta(model, tensors)
    program = _export(model, max_batch_size, max_seq_len, device="meta")
    problems: list[str] = []
    graph = import_program(program, name=_graph_name(model.config), input_dims=[{0: "batch", 1: "seq"}],
                           constant_source=_weight_source(tensors, model, problems), prefix=PREFIX)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FrontendError(f"checkpoint {where} does not fit its config ({len(problems)} problems):\n"
                            f"{listing}{more}")
    use_quantized_weights(graph)
    return graph


def import_model(model: nn.Module, tokenizer: Any = None, max_batch_size: int = 256,
                 max_seq_len: int = 8192) -> ImportedLM:
    """Import an in-memory ``transformers`` causal LM; its own tensors are the weights."""
    check_config(model.config)
    implementation, experts = model.config._attn_implementation, model.get_experts_implementation()
    own_attention = _writes_attention_out(type(model))  # keeps its mask, for the raise stage
    if not own_attention:
        model.set_attn_implementation(register_with_transformers())
    model.set_experts_implementation(register_experts())
    try:
        program = _export(model.eval(), max_batch_size, max_seq_len, device=str(model.device))
    finally:
        if not own_attention:
            model.set_attn_implementation(implementation)
        model.set_experts_implementation(experts)
    graph = import_program(program, name=_graph_name(model.config), input_dims=[{0: "batch", 1: "seq"}],
                           prefix=PREFIX)
    return ImportedLM(graph, tokenizer, model.config, model.dtype)


def _graph_name(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or [config.model_type]
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in architectures[0])
