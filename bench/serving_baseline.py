"""The serving baseline on one GPU: kiln's runtime with the reference backend (torch ops on
CUDA, no custom kernels) against transformers in the same run, and the hardware limits
measured in that run.

A Llama-3.1-8B-shaped model with random bf16 weights is built in the script (no
download). Measured: batch-1 decode (128-token prompt, 128 new tokens) and 128/128
throughput at several concurrencies, for kiln, transformers eager ``generate``, and
transformers with a static cache (whose forward it compiles with torch.compile); HBM
bandwidth (the better of a device copy and a read-only reduction over >= 1 GiB) and the
bf16 tensor-core rate (8192^3 matmul).

    python bench/serving_baseline.py --out results.json [--concurrency 1 4 16 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kiln.runtime.benchmark import hardware_limits, timed
from serving import bench_transformers, llama_8b, transformers_vocabulary

PROMPT, NEW = 128, 128


def weight_bytes(model) -> int:
    """What a decode step reads at batch 1: every matrix but the embedding, plus the LM head."""
    return sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n)


def prompts(count: int) -> torch.Tensor:
    return torch.randint(1000, 100000, (count, PROMPT), generator=torch.Generator().manual_seed(count))


def bench_kiln(model, concurrencies: list[int], record) -> None:
    import kiln

    start = time.perf_counter()
    engine = kiln.compile(model, target="h100", max_batch_size=max(concurrencies), max_seq_len=PROMPT + NEW + 16,
                          max_num_tokens=max(concurrencies) * PROMPT)
    build = time.perf_counter() - start
    llm = kiln.LLM(engine, kiln.RuntimeConfig(num_blocks=max(concurrencies) * (PROMPT + NEW) // 16 + 64))
    params = kiln.SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    llm.generate([prompts(1)[0].tolist()], kiln.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    record({"system": "kiln", "what": "build_seconds", "value": build, "nodes": len(engine.graph.nodes)})
    torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    for _ in llm.stream(prompts(1)[0].tolist(), params):
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    record({"system": "kiln", "what": "decode_batch1", "ttft_s": times[0],
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0])})
    for c in concurrencies:
        batch = [p.tolist() for p in prompts(c)]
        seconds = timed(lambda b=batch: llm.generate(b, params), "cuda")
        record({"system": "kiln", "what": "throughput", "concurrency": c, "output_tokens_per_s": c * NEW / seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--static-concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    results: list[dict] = []

    def record(entry: dict) -> None:
        results.append(entry)
        print(json.dumps(entry), flush=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "results": results}, indent=2))

    record({"system": "hardware", **asdict(hardware_limits("cuda"))})
    torch.cuda.empty_cache()
    model = llama_8b()
    record({"system": "model", "parameters": sum(p.numel() for p in model.parameters()),
            "decode_bytes": weight_bytes(model)})
    bench_kiln(model, args.concurrency, record)
    gc.collect()  # the engine's fused weights and KV cache go before the peers run
    torch.cuda.empty_cache()
    vocabulary, rng = transformers_vocabulary(model, None), random.Random(0)
    bench_transformers(model, PROMPT, NEW, args.concurrency, False, vocabulary, rng, record)
    bench_transformers(model, PROMPT, NEW, args.static_concurrency, True, vocabulary, rng, record)


if __name__ == "__main__":
    main()
