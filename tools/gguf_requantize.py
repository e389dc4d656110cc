"""Copy a GGUF file with its quantized matrices requantized into another block type that the
``gguf`` package can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): each is dequantized with
``gguf.quants`` and quantized again; metadata, tokenizer and plain tensors are copied as
they are. Used to try kiln's Q5_0 and Q5_1 support on SmolLM2-135M-Instruct's Q4_1 file
(the one real GGUF here, see FACTS.md).

    python tools/gguf_requantize.py MODEL.gguf OUT.gguf --type Q5_1 [--keep token_embd.weight]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PLAIN = ("F32", "F16", "BF16")  # copied as they are


def requantize(source: Path, target: Path, kind: str, keep: tuple[str, ...] = ()) -> dict[str, int]:
    """Write ``target``: ``source`` with every quantized tensor but those named in ``keep``
    requantized to ``kind``; return how many tensors of each type it holds."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name in PLAIN or tensor.name in keep or int(tensor.shape[0]) % block:
            data, raw_dtype = np.array(tensor.data), tensor.tensor_type
        else:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            data, raw_dtype, name = gguf.quants.quantize(weights, qtype), qtype, kind
        counts[name] = counts.get(name, 0) + 1
        # F32 and F16 are described by their numpy dtype; BF16 and block types come as bytes
        writer.add_tensor(tensor.name, data, raw_dtype=None if name in ("F32", "F16") else raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--type", default="Q5_1", choices=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    parser.add_argument("--keep", nargs="*", default=[], help="tensors copied as they are (token_embd.weight ...)")
    args = parser.parse_args()
    print(f"wrote {args.target}: {requantize(args.source, args.target, args.type, tuple(args.keep))}")


if __name__ == "__main__":
    main()
