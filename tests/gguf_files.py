"""Tiny llama GGUF files for the tests, written with the ``gguf`` package's ``GGUFWriter``.

The tokenizer is the bundled one (byte-level BPE), written as llama.cpp's metadata: its
tokens by id, its merges as ``"a b"`` strings, ``<|endoftext|>`` as a control token.
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 tensors are quantized from random weights by
``gguf.quants``; the K-quants and IQ4_NL, which that package cannot quantize, are random
blocks (every byte pattern is a valid block) whose float16 scales are set to small values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hf_models import BUNDLED

# llama.cpp's block sizes in weights and bytes, and where each block of a type written as random
# blocks keeps its float16 scales
RANDOM_BLOCKS = {"Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,)), "Q4_K": (256, 144, (0, 2)),
                 "Q5_K": (256, 176, (0, 2)), "Q6_K": (256, 210, (208,)), "IQ4_NL": (32, 18, (0,))}


def quantized(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``rows x cols`` matrix of GGUF type ``kind`` as its bytes ``[rows, bytes a row]``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in RANDOM_BLOCKS:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.1, qtype)
    block, size, scale_offsets = RANDOM_BLOCKS[kind]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(1e-4, 5e-4, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def bundled_tokenizer_metadata(writer) -> None:
    """The bundled tokenizer as llama.cpp's ``tokenizer.*`` metadata."""
    spec = json.loads((BUNDLED / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template((BUNDLED / "chat_template.jinja").read_text())


def write_llama_gguf(path: Path, types: dict[str, str], hidden: int = 256, intermediate: int = 512,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A random llama as a GGUF file; ``types`` gives each tensor's type by its GGUF name
    without the ``blk.N.`` prefix (``attn_q``, ``token_embd``, ``output``...), F32 by
    default; ``output`` missing means tied embeddings."""
    import gguf

    rng = np.random.default_rng(seed)
    vocab = json.loads((BUNDLED / "tokenizer.json").read_text())["model"]["vocab"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    bundled_tokenizer_metadata(writer)
    head_dim = hidden // heads
    shapes = {"token_embd": (len(vocab), hidden), "output": (len(vocab), hidden),
              "attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden), "ffn_down": (hidden, intermediate)}
    names = [("token_embd", "token_embd"), ("output_norm", None)]
    names += [("output", "output")] if "output" in types else []
    for layer in range(layers):
        names += [(f"blk.{layer}.attn_norm", None), (f"blk.{layer}.ffn_norm", None)]
        names += [(f"blk.{layer}.{part}", part) for part in shapes if part not in ("token_embd", "output")]
    for name, part in names:
        if part is None:  # a norm's weight
            writer.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
            continue
        kind = types.get(part, "F32")
        rows, cols = shapes[part]
        if kind in ("F32", "F16"):
            data = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor(f"{name}.weight", data)
        else:
            writer.add_tensor(f"{name}.weight", quantized(kind, rows, cols, rng),
                              raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
