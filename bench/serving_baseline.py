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
import time
from pathlib import Path

import torch

PROMPT, NEW = 128, 128


def timed(fn, repeat: int = 1) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``, synchronized."""
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def hardware_limits() -> dict:
    """HBM bandwidth and the bf16 matmul rate, measured now."""
    n = 1 << 30  # 2 GiB of bf16 per tensor
    x, y = torch.empty(n, dtype=torch.bfloat16, device="cuda"), torch.empty(n, dtype=torch.bfloat16, device="cuda")
    x.normal_()
    y.copy_(x)
    copy = 2 * x.nbytes / timed(lambda: y.copy_(x), 5)
    x.sum()
    reduce = x.nbytes / timed(lambda: x.sum(), 5)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    a @ a
    flops = 2 * 8192**3 / timed(lambda: a @ a, 10)
    return {"hbm_bytes_per_s": max(copy, reduce), "copy_bytes_per_s": copy, "reduce_bytes_per_s": reduce,
            "bf16_flops": flops}


def llama_8b():
    """A Llama-3.1-8B-shaped model on the GPU with random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config, device="cuda")  # to_empty left its buffers empty
    model.generation_config.pad_token_id = 0
    return model.eval()


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
        seconds = timed(lambda b=batch: llm.generate(b, params))
        record({"system": "kiln", "what": "throughput", "concurrency": c, "output_tokens_per_s": c * NEW / seconds})


def bench_transformers(model, concurrencies: list[int], static: bool, record) -> None:
    name = "transformers static+compile" if static else "transformers eager"
    extra = {"cache_implementation": "static"} if static else {}
    for c in concurrencies:
        ids = prompts(c).cuda()

        def run(ids=ids):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **extra)

        first = timed(run)
        seconds = timed(run) if static else first
        record({"system": name, "what": "throughput", "concurrency": c, "output_tokens_per_s": c * NEW / seconds,
                "first_call_s": first})


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

    record({"system": "hardware", **hardware_limits()})
    torch.cuda.empty_cache()
    model = llama_8b()
    record({"system": "model", "parameters": sum(p.numel() for p in model.parameters()),
            "decode_bytes": weight_bytes(model)})
    bench_kiln(model, args.concurrency, record)
    gc.collect()  # the engine's fused weights and KV cache go before the peers run
    torch.cuda.empty_cache()
    bench_transformers(model, args.concurrency, False, record)
    bench_transformers(model, args.static_concurrency, True, record)


if __name__ == "__main__":
    main()
