"""A Mixtral-8x7B-shaped layer stack on one GPU: kiln's CUDA target beside transformers
eager on the same layers, and the HBM bandwidth limit measured in the same run.

The model is ``--layers`` decoder layers of Mixtral-8x7B (hidden 4096, 32 query and 8
key/value heads, 8 experts of 14,336, 2 per token; vocabulary 32,000) with random bf16
weights, built on the device (no download). Both systems serve the same fresh random
prompts (``--input-len`` tokens, ``--output-len`` greedy new ones with ``ignore_eos``) at
each ``--batch``: kiln through ``kiln.runtime.benchmark.run_benchmark`` (CUDA graphs, its
fused MoE and paged-attention kernels), transformers with eager ``generate`` (timed on its
second call). Per batch the JSON holds both output rates (tokens/s from submission to the
last token), their ratio, kiln's decode-only rate, and the decode limit: the bytes a step
must read (every weight but the embedding table, with each layer's experts counted at the
expected number a batch touches under uniform routing, ``E (1 - (1 - k/E)^B)``: 2 of 8 at
batch 1, all 8 at 64) against the measured HBM bandwidth.

About a minute and a half on an H200 with the defaults (4 layers: 6 B parameters, 12 GB in
bf16, held once by each system). ``--device cpu --shape tiny`` runs the same on the CPU at
toy sizes with kiln's ``cpu`` target (what the tests run).

    python bench/moe_layers.py --out moe.json [--layers 4] [--batch 1 64]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from serving import ResultsFile, bench_transformers, random_model, transformers_vocabulary

import kiln
from kiln.runtime import LLMEngine, RuntimeConfig
from kiln.runtime.benchmark import cache_blocks, engine_options, hardware_limits, run_benchmark

SHAPES = {
    "mixtral-8x7b": {},  # MixtralConfig's defaults are Mixtral-8x7B's
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512),
}


def mixtral_layers(shape: str, layers: int, device: str, dtype: torch.dtype):
    """A Mixtral of ``layers`` decoder layers of ``shape`` with random weights on ``device``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**SHAPES[shape], num_hidden_layers=layers)
    return random_model(MixtralForCausalLM, config, device, dtype)


def step_bytes(model, batch: int) -> int:
    """Bytes one decode step of ``batch`` sequences must read: every parameter but the
    embedding table, each layer's experts at the share a batch is expected to touch."""
    config = model.config
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    touched = 1 - (1 - top_k / experts) ** batch
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" not in name:
            total += p.nbytes * (touched if ".experts." in name else 1)
    return int(total)


def bench_kiln(model, args: argparse.Namespace, device: str, record) -> dict[int, dict]:
    """Build kiln's engine for the model and serve each batch; kiln's result per batch."""
    options = {key: max(engine_options(args.input_len, args.output_len, b)[key] for b in args.batch)
               for key in engine_options(1, 1, 1)}
    start = time.perf_counter()
    engine = kiln.compile(model, target="cpu" if device == "cpu" else args.target, **options)
    record({"system": "kiln", "what": "build", "seconds": time.perf_counter() - start,
            "ops": dict(engine.graph.op_counts()), **options})
    llm_engine = LLMEngine(engine, RuntimeConfig(
        device=device, num_blocks=cache_blocks(args.input_len, args.output_len, max(args.batch))))
    results = {}
    for batch in args.batch:
        result = run_benchmark(llm_engine, args.input_len, args.output_len, batch, args.seed)
        results[batch] = result.to_dict()
        record({"system": "kiln", "what": "throughput", **results[batch]})
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    record = ResultsFile(args.out, device)
    limits = hardware_limits(device)
    record({"system": "hardware", **asdict(limits)})
    model = mixtral_layers(args.shape, args.layers, device, getattr(torch, args.dtype))
    record({"system": "model", "shape": args.shape, "layers": args.layers, "dtype": args.dtype,
            "parameters": sum(p.numel() for p in model.parameters())})
    kiln_results = bench_kiln(model, args, device, record)
    peers: list[dict] = []

    def keep(entry: dict) -> None:
        peers.append(entry)
        record(entry)

    bench_transformers(model, args.input_len, args.output_len, args.batch, False,
                       transformers_vocabulary(model, None), random.Random(args.seed), keep)
    summary = []
    for peer in peers:
        batch, ours = peer["concurrency"], kiln_results[peer["concurrency"]]
        limit = batch * limits.memory_bytes_per_s / step_bytes(model, batch)
        decode = ours["decode_steps_per_s"] * batch if ours["decode_steps_per_s"] else None
        summary.append({"batch": batch, "kiln_output_tokens_per_s": ours["output_tokens_per_s"],
                        "transformers_output_tokens_per_s": peer["output_tokens_per_s"],
                        "ratio": ours["output_tokens_per_s"] / peer["output_tokens_per_s"],
                        "kiln_decode_tokens_per_s": decode, "decode_limit_tokens_per_s": limit,
                        "kiln_decode_fraction_of_limit": decode / limit if decode else None,
                        "step_bytes": step_bytes(model, batch), "transformers_seconds": peer["seconds"],
                        "transformers_first_call_s": peer["first_call_s"]})
        record({"system": "comparison", **summary[-1]})
    return {"hardware": asdict(limits), "summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of results (rewritten per record)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--target", default="cuda", help="kiln's GPU target (the CPU always uses 'cpu')")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="mixtral-8x7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
