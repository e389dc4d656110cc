"""Where a step's time goes: decode steps at several batch sizes, a mixed step and one long prefill,
timed on the host and profiled with the torch profiler (GPU busy time against wall
time, and the kernels that take it).

    python bench/profile_step.py [--model DIR] [--dtype bfloat16] [--batch 1 64 256] [--prompt 128] [--out DIR]

Without ``--model`` it builds the Llama-3.1-8B shape with random bf16 weights
(``bench/serving.py``'s ``llama_8b``). Each figure uses fresh random prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import kiln
from kiln.runtime import LLMEngine, RuntimeConfig, SamplingParams


def fresh_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (count, length), generator=g).tolist()


def prefill_then(llm: LLMEngine, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    while any(s.num_cached < len(s.prompt_ids) for s in llm.sequences.values()):
        llm.step()


def gpu_idle(prof) -> tuple[float, float]:
    """Microseconds from the first GPU event to the last, and the fraction of that span in
    which no kernel or copy ran (overlapping events merged)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0, spans[0][0]
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = end - spans[0][0]
    return span, 1 - busy / span


def profiled_steps(llm: LLMEngine, calls: int, trace: Path | None) -> tuple[float, float]:
    """Profile ``calls`` calls of ``step()`` in the steady state (the step launched before
    the first call still in flight, as when serving), print the kernels that took the GPU's
    time, finish the requests, and save the trace; (GPU span in microseconds, the fraction
    of it the GPU was idle).

    The span runs from the first kernel of the first step launched inside the window to
    the end of the last: every step in it is one the host had to keep the GPU fed through."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            llm.step()
        torch.cuda.synchronize()
    while llm.has_unfinished():
        llm.step()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    return gpu_idle(prof)


def decode_profile(llm: LLMEngine, batch: int, prompt: int, vocab: int, out: Path | None, seed: int) -> dict:
    """Decode steps of ``batch`` sequences: timed over 24 steps (the median and longest
    return-to-return interval of ``step()`` too), then 6 profiled."""
    steps = 24
    prefill_then(llm, fresh_prompts(batch, prompt, vocab, seed), steps + 16)
    for _ in range(3):
        llm.step()
    torch.cuda.synchronize()
    ends = [time.perf_counter()]
    for _ in range(steps):
        llm.step()
        ends.append(time.perf_counter())
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - ends[0]) / steps
    intervals = sorted(b - a for a, b in zip(ends, ends[1:]))
    span, idle = profiled_steps(llm, 6, out / f"decode-{batch}.json" if out else None)
    return {"batch": batch, "ms_per_step": per_step * 1e3, "tokens_per_s": batch / per_step,
            "step_interval_ms_median": intervals[steps // 2] * 1e3, "step_interval_ms_max": intervals[-1] * 1e3,
            "gpu_ms_per_step_profiled": span / 6e3, "gpu_idle_fraction": idle, "profiled_steps": 6}


def mixed_profile(llm: LLMEngine, decodes: int, chunk: int, vocab: int, out: Path | None, seed: int) -> dict:
    """A mixed step: a fresh prompt of ``chunk`` tokens prefilled beside ``decodes``
    decoding sequences, profiled over the two ``step()`` calls that launch and finish it."""
    prefill_then(llm, fresh_prompts(decodes, 128, vocab, seed), 64)
    for _ in range(3):
        llm.step()
    llm.add_request(fresh_prompts(1, chunk, vocab, seed + 1)[0],
                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    span, idle = profiled_steps(llm, 2, out / f"mixed-{decodes}-{chunk}.json" if out else None)
    return {"decodes": decodes, "chunk": chunk, "gpu_ms_two_calls": span / 1e3, "gpu_idle_fraction": idle}


def prefill_time(llm: LLMEngine, length: int, vocab: int, seed: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.add_request(fresh_prompts(1, length, vocab, seed)[0], params)
    while llm.has_unfinished():
        llm.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--dtype", default=None, help="the engine's dtype (default: the model's)")
    parser.add_argument("--mixed", type=int, nargs=2, default=[63, 512], metavar=("DECODES", "CHUNK"),
                        help="profile a step that prefills CHUNK new tokens beside DECODES decodes")
    parser.add_argument("--quantization", default=None, help="a quantization scheme (fp8, int8, int4, ...)")
    parser.add_argument("--target", default="cuda", help="kiln's target: cuda (this GPU), h100 or h200")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        from serving import llama_8b

        model = llama_8b()
    else:
        model = args.model
    max_batch = max(args.batch)
    start = time.perf_counter()
    engine = kiln.compile(model, target=args.target, dtype=args.dtype, max_batch_size=max_batch,
                          max_seq_len=max(args.prefill, 512) + 64, quantization=args.quantization,
                          max_num_tokens=max(max_batch * args.prompt, args.prefill))
    built = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    vocab = engine.vocab_size
    start = time.perf_counter()
    llm = LLMEngine(engine, RuntimeConfig(num_blocks=max_batch * (args.prompt + 64) // 16 + args.prefill // 16 + 64))
    ready = time.perf_counter() - start
    results = {"device": torch.cuda.get_device_name(), "build_s": built, "runtime_start_s": ready,
               "kernel_configs": engine.kernel_configs, "decode": []}
    print(json.dumps({k: results[k] for k in ("build_s", "runtime_start_s", "kernel_configs")}), flush=True)
    prefill_time(llm, args.prefill, vocab, seed=1)  # warm-up of the prefill shapes
    results["ttft_s"] = [prefill_time(llm, args.prefill, vocab, seed=2 + i) for i in range(3)]
    print(json.dumps({"ttft_s": results["ttft_s"]}), flush=True)
    for i, batch in enumerate(args.batch):
        entry = decode_profile(llm, batch, args.prompt, vocab, args.out, seed=100 + i)
        results["decode"].append(entry)
        print(json.dumps(entry), flush=True)
    results["mixed"] = mixed_profile(llm, *args.mixed, vocab, args.out, seed=200)
    print(json.dumps(results["mixed"]), flush=True)
    if args.out is not None:
        (args.out / "profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
