"""Benchmarks of an engine against the device it runs on: the device's limits (memory
bandwidth, matmul rate), what one decode step must read and compute, and a serving run
that timestamps every token each request receives.

``kiln bench`` and ``bench/serving.py`` are built on this module. A serving run's figures
and the limits are measured in the same process, so that the fractions compare like
with like.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..ir.opdefs.quantized import QUANTIZED_LINEARS
from .engine import Engine
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams

MAX_STEP_TOKENS = 16384  # the most tokens per step that ``engine_options`` asks for
WARMUP_TOKENS = 4  # new tokens of the short warm-up request


# the device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareLimits:
    """What the device does at best, measured now. Memory bandwidth (HBM on a GPU) is the
    better of a copy (bytes read plus written) and a read-only reduction; the matmul rate
    is that of a square matmul of random data in ``matmul_dtype`` (bf16 tensor cores on a
    GPU, float32 on the CPU)."""

    device: str
    memory_bytes_per_s: float
    copy_bytes_per_s: float
    reduce_bytes_per_s: float
    matmul_flops: float
    matmul_dtype: str


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str, repeat: int = 1) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``, the device synchronized
    before and after each."""
    device = torch.device(device)
    best = float("inf")
    for _ in range(repeat):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _best_after_warmup(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()
    return timed(fn, device, repeat)


def hardware_limits(device: torch.device | str = "cuda", repeat: int = 5) -> HardwareLimits:
    """Measure the memory bandwidth and the matmul rate of ``device``: on CUDA a 2 GiB
    copy and a 2 GiB sum of bf16 and an 8192^3 bf16 matmul; on the CPU the same over
    256 MiB of float32 and a 1024^3 float32 matmul. Each figure is the best of ``repeat``
    timed calls after an untimed one."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype, nbytes, n = (torch.bfloat16, 2 << 30, 8192) if gpu else (torch.float32, 256 << 20, 1024)
    x = torch.randn(nbytes // dtype.itemsize, dtype=dtype, device=device)
    y = torch.empty_like(x)
    copy = 2 * x.nbytes / _best_after_warmup(lambda: y.copy_(x), device, repeat)
    reduce = x.nbytes / _best_after_warmup(lambda: x.sum(), device, repeat)
    del x, y
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    flops = 2 * n**3 / _best_after_warmup(lambda: a @ b, device, repeat)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    return HardwareLimits(name, max(copy, reduce), copy, reduce, flops, str(dtype).removeprefix("torch."))


# the engine ---------------------------------------------------------------------------


def _nbytes(value) -> int:
    return -(-value.type.static_numel * value.dtype.bits // 8)


def _only_gathered(value) -> bool:
    """Whether every use of ``value`` is as the table of an ``embedding``, which reads
    only the rows of the step's tokens."""
    return all(use.node.op == "embedding" and use.index == 1 for use in value.uses)


def decode_bytes(engine: Engine) -> int:
    """Bytes that one batch-1 decode step must read: every constant the step graph uses,
    except embedding tables that are only gathered from. A table tied to the LM head is
    read whole by the head's ``linear``, and counted once. The KV cache and activations
    are left out."""
    return sum(_nbytes(v) for v in engine.graph.constants.values() if v.uses and not _only_gathered(v))


def linear_weight_elements(engine: Engine) -> int:
    """Elements of the weights of every ``linear`` node of the step graph, quantized ones
    counted as the [out, in] weights they stand for."""
    return sum(int(node.inputs[0].shape[-1]) * int(node.results[0].shape[-1]) for node in engine.graph.nodes
               if node.op in ("linear", *QUANTIZED_LINEARS))


def step_flops(engine: Engine, tokens: int) -> int:
    """FLOPs of running ``tokens`` tokens through the model: 2 x the linear layers'
    weight elements per token (a multiply and an add each). Attention's own FLOPs (scores
    and the weighted sum over the context) are left out: at the lengths benchmarked
    they are a few percent of the linear layers'. The LM head counts for every token,
    though the step computes logits only where a token is sampled."""
    return 2 * linear_weight_elements(engine) * tokens


def engine_options(input_len: int, output_len: int, concurrency: int) -> dict[str, int]:
    """``kiln.compile`` limits that serve ``concurrency`` requests of ``input_len`` +
    ``output_len`` tokens at once, each prompt prefilled in one step (up to
    ``MAX_STEP_TOKENS`` tokens a step for all prompts together)."""
    return {"max_batch_size": concurrency, "max_seq_len": input_len + output_len,
            "max_num_tokens": max(input_len, min(concurrency * input_len, MAX_STEP_TOKENS))}


def cache_blocks(input_len: int, output_len: int, concurrency: int, block_size: int = 16) -> int:
    """KV-cache blocks that hold ``concurrency`` sequences at full length."""
    return concurrency * -(-(input_len + output_len) // block_size)


# prompts ------------------------------------------------------------------------------


def prompt_vocabulary(vocab_size: int, tokenizer: Any = None, exclude: Iterable[int] = ()) -> list[int]:
    """The token ids that random prompts draw from: those below ``vocab_size`` (and the
    tokenizer's length), bar the tokenizer's special tokens and ``exclude``."""
    if tokenizer is not None:
        vocab_size = min(vocab_size, len(tokenizer))
        exclude = {*exclude, *tokenizer.all_special_ids}
    excluded = set(exclude)
    return [i for i in range(vocab_size) if i not in excluded]


def random_prompts(count: int, length: int, vocabulary: Sequence[int], rng: random.Random) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids drawn uniformly from ``vocabulary``."""
    return [rng.choices(vocabulary, k=length) for _ in range(count)]


# the serving run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    """The 50th, 90th and 99th percentiles of a sample (linear interpolation)."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        """The percentiles of ``values``; None when there are none."""
        if not values:
            return None
        return cls(*(float(p) for p in np.percentile(values, [50, 90, 99])))


@dataclass(frozen=True)
class BenchmarkResult:
    """One serving run: ``concurrency`` requests of ``input_len`` prompt tokens and
    ``output_len`` new tokens, submitted at once; times in seconds.

    - ``seconds``: from the submission to the last token; the rates per second divide by it.
    - ``ttft_s``: submission to each request's first token; ``itl_s``: the gaps between
      consecutive tokens of a request, over all requests (None when ``output_len`` is 1).
    - ``decode_tokens_per_s_per_request``: the median over requests of (tokens 2..N) / (the
      time from the first token to the last).
    - The decode phase runs from the last request's first token (every prompt is in
      the cache by then) to the last token; ``decode_steps_per_s`` counts the steps that
      end in it, and ``decode_bytes_per_s`` is ``decode_bytes`` (the weights a step reads)
      times that rate: the bandwidth the weights alone take, whatever the batch.
    - ``flops_per_s``: ``step_flops`` of every token the model ran (each prompt token and
      every new token but the last of each request) over ``seconds``.
    - The fractions are of the limits given to ``run_benchmark`` (None without them or
      without a decode phase)."""

    input_len: int
    output_len: int
    concurrency: int
    seconds: float
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_s: Percentiles
    itl_s: Percentiles | None
    decode_tokens_per_s_per_request: float | None
    steps: int
    decode_steps_per_s: float | None
    decode_bytes_per_s: float | None
    flops_per_s: float
    bandwidth_fraction: float | None
    tensor_core_fraction: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Trace:
    """When the requests went in, when each step ended, and when each request got each token."""

    submitted: float
    step_ends: list[float]
    token_times: list[list[float]]


def _serve(llm_engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> _Trace:
    """Submit every prompt at once, step until all are done, and timestamp each token on
    the host as ``step()`` returns it (``step()`` waits for the device: sampling copies
    the tokens to the host)."""
    submitted = time.perf_counter()
    times: dict[str, list[float]] = {llm_engine.add_request(p, params): [] for p in prompts}
    step_ends: list[float] = []
    while llm_engine.has_unfinished():
        outputs = llm_engine.step()
        now = time.perf_counter()
        step_ends.append(now)
        for output in outputs:
            if output.error:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            got = times[output.request_id]
            got += [now] * (len(output.token_ids) - len(got))
    return _Trace(submitted, step_ends, list(times.values()))


def run_benchmark(llm_engine: LLMEngine, input_len: int, output_len: int, concurrency: int, seed: int = 0,
                  limits: HardwareLimits | None = None, full_warmup: bool = False) -> BenchmarkResult:
    """Serve ``concurrency`` random prompts of ``input_len`` tokens at once, each to
    ``output_len`` greedy tokens (``ignore_eos``), through ``llm_engine``, which must be
    idle; see ``BenchmarkResult`` for what is measured.

    A short request (an ``input_len`` prompt, a few new tokens) runs first, untimed. With
    ``full_warmup`` the whole workload also runs once untimed, so that the timed pass
    meets no shape for the first time (kernels that plan per shape, such as cuDNN's
    attention, then cost nothing extra). Prompts are drawn from ``seed`` and the count of
    prompt tokens the engine has taken so far: every call gets new prompts (a repeated
    prompt would hit the prefix cache), and a new process repeats them."""
    if min(input_len, output_len, concurrency) < 1:
        raise ValueError(f"input_len, output_len and concurrency must be positive, got {input_len}, "
                         f"{output_len}, {concurrency}")
    if llm_engine.has_unfinished():
        raise RuntimeError("the engine is serving other requests; a benchmark needs it idle")
    engine = llm_engine.engine
    rng = random.Random(f"{seed}/{llm_engine.prompt_tokens}")
    vocabulary = prompt_vocabulary(engine.vocab_size, engine.tokenizer, engine.info.stop_token_ids)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    _serve(llm_engine, random_prompts(1, input_len, vocabulary, rng),
           SamplingParams(max_tokens=min(output_len, WARMUP_TOKENS), temperature=0, ignore_eos=True))
    if full_warmup:
        _serve(llm_engine, random_prompts(concurrency, input_len, vocabulary, rng), params)
    trace = _serve(llm_engine, random_prompts(concurrency, input_len, vocabulary, rng), params)
    return _summarize(trace, engine, input_len, output_len, limits)


def _summarize(trace: _Trace, engine: Engine, input_len: int, output_len: int,
               limits: HardwareLimits | None) -> BenchmarkResult:
    tokens = trace.token_times
    concurrency = len(tokens)
    end = max(t[-1] for t in tokens)
    seconds = end - trace.submitted
    output_tokens = sum(len(t) for t in tokens)
    decode_rates = [(len(t) - 1) / (t[-1] - t[0]) for t in tokens if len(t) > 1]
    decode_start = max(t[0] for t in tokens)
    decode_steps = sum(1 for s in trace.step_ends if s > decode_start)
    steps_per_s = decode_steps / (end - decode_start) if decode_steps else None
    bytes_per_s = decode_bytes(engine) * steps_per_s if steps_per_s else None
    flops_per_s = step_flops(engine, concurrency * input_len + output_tokens - concurrency) / seconds
    return BenchmarkResult(
        input_len=input_len, output_len=output_len, concurrency=concurrency, seconds=seconds,
        output_tokens=output_tokens, output_tokens_per_s=output_tokens / seconds,
        total_tokens_per_s=(concurrency * input_len + output_tokens) / seconds,
        ttft_s=Percentiles.of([t[0] - trace.submitted for t in tokens]),
        itl_s=Percentiles.of([b - a for t in tokens for a, b in zip(t, t[1:])]),
        decode_tokens_per_s_per_request=float(np.median(decode_rates)) if decode_rates else None,
        steps=len(trace.step_ends), decode_steps_per_s=steps_per_s, decode_bytes_per_s=bytes_per_s,
        flops_per_s=flops_per_s,
        bandwidth_fraction=bytes_per_s / limits.memory_bytes_per_s if limits and bytes_per_s else None,
        tensor_core_fraction=flops_per_s / limits.matmul_flops if limits else None)


# reports ------------------------------------------------------------------------------


def _ms(p: Percentiles | None) -> str:
    return "-" if p is None else f"{p.p50 * 1e3:.1f}/{p.p90 * 1e3:.1f}/{p.p99 * 1e3:.1f}"


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(results: Sequence[BenchmarkResult], limits: HardwareLimits, step_bytes: int) -> str:
    """The limits and what they allow a decode step of ``step_bytes``, then a table of
    ``results``, one row a run."""
    lines = [f"memory {limits.memory_bytes_per_s / 1e9:.1f} GB/s (copy {limits.copy_bytes_per_s / 1e9:.1f}, "
             f"sum {limits.reduce_bytes_per_s / 1e9:.1f}); matmul {limits.matmul_flops / 1e12:.3g} TFLOP/s "
             f"({limits.matmul_dtype}); a decode step reads {step_bytes / 1e9:.3g} GB: at most "
             f"{limits.memory_bytes_per_s / step_bytes:,.0f} steps/s", ""]
    headers = ("concurrency", "out tok/s", "total tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
               "decode tok/s/req", "of bandwidth", "of matmul")
    rows = [(str(r.concurrency), f"{r.output_tokens_per_s:,.1f}", f"{r.total_tokens_per_s:,.1f}", _ms(r.ttft_s),
             _ms(r.itl_s), _maybe(r.decode_tokens_per_s_per_request, ",.1f"), _maybe(r.bandwidth_fraction, ".1%"),
             _maybe(r.tensor_core_fraction, ".1%")) for r in results]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in (headers, *rows)]
    return "\n".join(lines)
