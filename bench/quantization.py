"""Quantized engines side by side with bf16 on one GPU: batch-1 decode and throughput at
full concurrency for each scheme, on the Llama-3.1-8B shape with random weights (or a
checkpoint directory), the device's limits measured in the same run.

Each scheme's engine is built from the same model by kiln's pipeline (weights quantized
on the GPU), served through ``kiln.runtime.benchmark.run_benchmark`` (fresh random
prompts, greedy, ``ignore_eos``), each workload in two passes (the first meets each shape
for the first time), and freed before the next. ``--long`` adds 128/2048 and 2048/128.

    python bench/quantization.py --out quantization.json
    python bench/quantization.py --schemes none fp8 --concurrency 1 256 --long --out fp8.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kiln  # noqa: E402
from kiln.runtime import LLMEngine, RuntimeConfig  # noqa: E402
from kiln.runtime.benchmark import (cache_blocks, decode_bytes, engine_options, hardware_limits,  # noqa: E402
                                    run_benchmark)
from serving import ResultsFile, checkpoint_model, llama_8b  # noqa: E402

SCHEMES = ("none", "int8", "int4", "fp8")


def kv_capacity(engine, memory_fraction: float = 0.9) -> dict:
    """The KV cache's bytes a token and the tokens that fit in ``memory_fraction`` of this
    GPU's memory beside the weights a step reads (as the runtime sizes its cache)."""
    per_token = engine.cache_spec.bytes_per_token()
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    return {"kv_bytes_per_token": per_token,
            "kv_tokens_fit": max(int(total * memory_fraction) - decode_bytes(engine), 0) // per_token}


def bench_scheme(model, scheme: str, args: argparse.Namespace, limits, record) -> None:
    """Build the engine of ``scheme`` and run every workload on it."""
    runs = [(args.input_len, args.output_len, c) for c in args.concurrency]
    if args.long:
        runs += [(args.input_len, 2048, args.concurrency[-1]), (2048, args.output_len, args.concurrency[-1])]
    options = {key: max(engine_options(*run)[key] for run in runs) for key in engine_options(1, 1, 1)}
    start = time.perf_counter()
    engine = kiln.compile(model, target=args.target, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                          quantization=None if scheme == "none" else scheme, **options)
    if args.kv_cache_dtype != "auto":
        scheme = f"{scheme}+kv-{args.kv_cache_dtype}"
    record({"scheme": scheme, "what": "build", "seconds": time.perf_counter() - start,
            "decode_bytes": decode_bytes(engine), **kv_capacity(engine), "ops": engine.graph.op_counts()})
    llm_engine = LLMEngine(engine, RuntimeConfig(num_blocks=max(cache_blocks(*run) for run in runs)))
    for input_len, output_len, concurrency in runs:
        for number in (1, 2):
            result = run_benchmark(llm_engine, input_len, output_len, concurrency, args.seed, limits)
            record({"scheme": scheme, "what": "throughput", "pass": number, **result.to_dict()})
    del llm_engine, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of results (rewritten per record)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the 8B shape, random)")
    parser.add_argument("--target", default="cuda",
                        help="kiln's target: cuda (this GPU, whichever it is), h100, h200, or cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--long", action="store_true", help="also 128/2048 and 2048/128 at the largest concurrency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cpu" if args.target == "cpu" else "cuda"
    record = ResultsFile(args.out, device)
    limits = hardware_limits(device)
    record({"scheme": "hardware", **asdict(limits)})
    model = checkpoint_model(args.model, args.dtype, device) if args.model else llama_8b(device)
    for scheme in args.schemes:
        bench_scheme(args.model or model, scheme, args, limits, record)
    summary = {}
    for r in record.results:
        if r.get("what") == "throughput" and r["pass"] == 2:
            summary.setdefault(r["scheme"], {})[f"{r['input_len']}/{r['output_len']} x{r['concurrency']}"] = round(
                r["output_tokens_per_s"], 1)
    print(json.dumps({"output tok/s (second pass)": summary}, indent=2))


if __name__ == "__main__":
    main()
