"""llama.cpp's GGUF files as kiln models: ``kiln.compile("model.gguf")``.

The file is read with the ``gguf`` package (memory-mapped; no weight is read until the
engine needs it). Its metadata gives the transformers config (``llama.*`` keys), the
tokenizer and the chat template (``gguf_tokenizer.py``); its tensors are renamed to the
transformers model's parameters (``blk.3.attn_q.weight`` is
``model.layers.3.self_attn.q_proj.weight``) and imported through the same path as a
Hugging Face checkpoint. Quantized matrices stay in their bits (``gguf_quants.py``:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K); where a quantized tensor is not a linear layer's weight
(the token embedding) it is dequantized into the model's dtype. F32, F16 and BF16 tensors
load as they are; every other type is refused by name. llama.cpp stores the rows of the
query and key projections permuted for its rotary layout; they are put back.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FrontendError
from .gguf_quants import REPACKERS, quantized_linear
from .gguf_tokenizer import gguf_tokenizer
from .huggingface import ImportedLM, build_model, import_weights, resolve_dtype
from .quantized_linear import QuantizedRef

PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
# transformers' LlamaConfig field -> the GGUF key under "llama."
_CONFIG_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
                "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
                "max_position_embeddings": "context_length", "rope_theta": "rope.freq_base"}


@dataclass(frozen=True)
class GGUFTensor:
    """A plain (F32, F16, BF16) GGUF tensor, as the importer sees a checkpoint tensor."""

    data: np.ndarray  # as the reader maps it (BF16 as bytes)
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str
    file: str
    rows: torch.Tensor | None = None  # the row order (query and key projections)

    @property
    def where(self) -> str:
        return self.file

    @property
    def describe(self) -> str:
        return f"{self.file}:{self.key}"

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor (cast to ``dtype``)."""
        raw = np.array(self.data)
        if self.dtype == torch.bfloat16:
            raw = raw.view(np.int16)
        tensor = torch.from_numpy(raw.reshape(self.shape))
        tensor = tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor
        tensor = tensor if self.rows is None else tensor[self.rows]
        return tensor if dtype is None else tensor.to(dtype)


def metadata_value(field: Any) -> Any:
    """A GGUF metadata field's value: a number, a string, or a list of either."""
    from gguf import GGUFValueType

    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[1] == GGUFValueType.ARRAY:
            return None  # nested arrays: no key kiln reads holds one
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return np.concatenate([field.parts[i] for i in field.data]).tolist() if len(field.data) else []
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[Any]]:
    """The file's metadata (key -> value) and its tensors (``gguf.ReaderTensor``)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise FrontendError(f"{path.name} is not a readable GGUF file: {exc}") from None
    return {key: metadata_value(field) for key, field in reader.fields.items()}, list(reader.tensors)


def gguf_config(metadata: dict[str, Any], tied: bool) -> Any:
    """The transformers ``LlamaConfig`` that the file's ``llama.*`` metadata describes."""
    from transformers import LlamaConfig

    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise FrontendError(f"the GGUF's general.architecture is {architecture!r}: kiln reads 'llama' GGUF files")
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise FrontendError(f"the GGUF's llama.rope.scaling.type is {scaling!r}: kiln reads unscaled rotary only")
    missing = [f"llama.{key}" for key in _CONFIG_KEYS.values() if f"llama.{key}" not in metadata
               and key not in ("attention.head_count_kv", "rope.freq_base", "context_length")]
    if missing:
        raise FrontendError(f"the GGUF lacks {', '.join(missing)}")
    options = {field: metadata[f"llama.{key}"] for field, key in _CONFIG_KEYS.items() if f"llama.{key}" in metadata}
    heads = options["num_attention_heads"]
    head_dim = metadata.get("llama.attention.key_length", options["hidden_size"] // heads)
    vocab = metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])))
    ids = {name: metadata.get(f"tokenizer.ggml.{key}_token_id") for name, key in
           (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))}
    return LlamaConfig(vocab_size=vocab, head_dim=head_dim, tie_word_embeddings=tied,
                       architectures=["LlamaForCausalLM"], **options, **ids)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)  # a llama has no biases
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def rotary_rows(out_features: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's permutation of a query or key projection
    (each head's rotary halves interleaved) for ``heads`` heads."""
    half = out_features // heads // 2
    return torch.arange(out_features).view(heads, half, 2).transpose(1, 2).reshape(-1)


def gguf_tensors(tensors: list[Any], config: Any, file: str) -> dict[str, GGUFTensor | QuantizedRef]:
    """The file's tensors by the model's parameter names; unsupported types and unknown
    tensors are refused, all named at once."""
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    refs: dict[str, GGUFTensor | QuantizedRef] = {}
    problems = []
    for tensor in tensors:
        name, kind = _hf_name(tensor.name), tensor.tensor_type.name
        if name is None:
            problems.append(f"tensor {tensor.name} has no place in a llama model")
            continue
        if kind not in PLAIN and kind not in REPACKERS:
            problems.append(f"tensor {tensor.name} is {kind}")
            continue
        in_features = int(tensor.shape[0])
        out_features = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
        projection = next((p for p in heads if name.endswith(f"{p}.weight")), None)
        rows = rotary_rows(out_features, heads[projection]) if projection else None
        where = f"{file}:{tensor.name} ({kind})"
        if kind in PLAIN:
            shape = tuple(int(n) for n in reversed(tensor.shape))
            refs[name] = GGUFTensor(tensor.data, shape, PLAIN[kind], tensor.name, file, rows)
        else:
            refs[name] = QuantizedRef((out_features, in_features), file, where,
                                      lambda dtype, t=tensor, k=kind, r=rows, w=where, n=in_features:
                                      quantized_linear(k, t.data, n, dtype, r, w))
    if problems:
        raise FrontendError(f"cannot serve {file}: " + "; ".join(problems)
                            + f" (kiln serves {', '.join(REPACKERS)} and {', '.join(PLAIN)} tensors)")
    return refs


def load_gguf(path: str | Path, dtype: str | torch.dtype | None = None, max_batch_size: int = 256,
              max_seq_len: int = 8192) -> ImportedLM:
    """Import the llama model in GGUF file ``path`` (float32 weights unless ``dtype`` says)."""
    path = Path(path)
    metadata, tensors = read_gguf(path)
    config = gguf_config(metadata, tied=not any(t.name == "output.weight" for t in tensors))
    refs = gguf_tensors(tensors, config, path.name)
    tokenizer = gguf_tokenizer(metadata)
    dtype = resolve_dtype(dtype, config)
    model = build_model(config, dtype)
    graph = import_weights(model, refs, max_batch_size, max_seq_len, str(path))
    types = Counter(t.tensor_type.name for t in tensors)
    scheme = {"method": "gguf", "file_type": metadata.get("general.file_type"),
              "tensor_types": dict(sorted(types.items()))}
    return ImportedLM(graph, tokenizer, config, dtype, scheme)
