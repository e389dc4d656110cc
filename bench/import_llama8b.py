"""Import time and peak memory of a Llama-3.1-8B-shaped checkpoint.

Writes random bf16 weights in Llama-3.1-8B's shapes (sharded safetensors, 16 GB) with
the bundled tokenizer, then, in a fresh process, times ``load_checkpoint`` (export +
import) and ``kiln.compile`` (import + cleanup pipeline) and reads the peak resident
memory. Needs about 17 GB of disk.

    python bench/import_llama8b.py --dir /tmp/llama8b          # the real shape
    python bench/import_llama8b.py --dir /tmp/small --layers 2 --hidden 512   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = Path(__file__).resolve().parents[1] / "models"


def write_checkpoint(out: Path, layers: int, hidden: int, ffn: int, vocab: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(out)
    kv = config.num_key_value_heads * 128
    gen = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map, params = {}, 0
    shards = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, ffn)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shards += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    start, group, size, index = time.time(), {}, 0, 0
    for n, (name, shape) in enumerate(shards):
        group[name] = weight(*shape)
        size += group[name].numel() * 2
        params += group[name].numel()
        if size > 4e9 or n == len(shards) - 1:
            file = f"model-{index:05d}.safetensors"
            save_file(group, out / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in group})
            group, size, index = {}, 0, index + 1
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (MODELS / name).exists():
            shutil.copy(MODELS / name, out / name)
    print(f"wrote {params / 1e9:.2f} B parameters in {index} shards in {time.time() - start:.0f} s")


MEASURE = """
import resource, sys, time, torch
import kiln
from kiln.frontends.huggingface import load_checkpoint
start = time.perf_counter()
lm = load_checkpoint(sys.argv[1], max_seq_len=8192)
imported = time.perf_counter() - start
start = time.perf_counter()
engine = kiln.compile(sys.argv[1], max_seq_len=8192)
compiled = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"load_checkpoint: {imported:.2f} s, {len(lm.graph.nodes)} nodes, {len(lm.graph.constants)} constants")
print(f"kiln.compile:    {compiled:.2f} s, {len(engine.graph.nodes)} nodes after cleanup")
print(f"peak resident memory of the process: {peak:.2f} GiB")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--measure-only", action="store_true", help="reuse the checkpoint already in --dir")
    args = parser.parse_args()
    out = Path(args.dir)
    if not args.measure_only:
        write_checkpoint(out, args.layers, args.hidden, args.ffn, args.vocab)
    print(f"checkpoint: {sum(f.stat().st_size for f in out.glob('*.safetensors')) / 2**30:.2f} GiB on disk")
    subprocess.run([sys.executable, "-c", MEASURE, str(out)], check=True)


if __name__ == "__main__":
    main()
