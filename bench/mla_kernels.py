"""The Triton multi-head latent attention alone, at DeepSeek-V3's head shapes (128 heads,
rank 512, rope 64, nope and v_dim 128, bf16, blocks of 16), against the HBM bandwidth and
the bf16 matmul rate measured in the same run, beside the reference backend's torch form
of the same math (``backends/mla.py``) on the same steps.

A decode step must read each context's cached rows (576 bf16 values per token) and ``kv_b``
(absorbed into the queries and applied to the output: 128 x 256 x 512 values); its
bandwidth counts those bytes once over the step's time. A prefill step is counted in
FLOP/s of the absorbed form: ``2 x heads x (rank + rope + rank)`` per (query, key) pair of
the causal mask, plus the two ``kv_b`` GEMMs. kiln's kernels are timed replayed from a CUDA
graph; the reference reads sizes back to the host and cannot be captured, so it is timed
with plain launches. ``--device cpu`` runs the same cases at toy sizes under Triton's
interpreter (what the tests run; its times say nothing about speed).

    python bench/mla_kernels.py --out mla.json
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from kiln.backends.mla import paged_mla_attention as reference_mla
from kiln.runtime.benchmark import hardware_limits, timed

SHAPES = {"deepseek-v3": dict(heads=128, nope=128, rope=64, v_dim=128, rank=512),
          "tiny": dict(heads=4, nope=16, rope=8, v_dim=16, rank=32)}
# name -> (cached tokens per sequence, new tokens per sequence), at DeepSeek-V3's scale
CASES = {"decode 1 x 4k": ([4095], [1]), "decode 1 x 32k": ([32767], [1]), "decode 64 x 2k": ([2047] * 64, [1] * 64),
         "decode 256 x 1k": ([1023] * 256, [1] * 256), "prefill 2k": ([0], [2048]),
         "chunk of 512 over 4k": ([4096], [512])}


def step_cost(cached: list[int], new: list[int], heads: int, nope: int, rope: int, v_dim: int,
              rank: int) -> tuple[int, int]:
    """(bytes a step must read at least in bf16, its FLOPs in the absorbed form)."""
    context = sum(c + n for c, n in zip(cached, new))
    tokens = sum(new)
    kv_b = heads * (nope + v_dim) * rank
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in zip(cached, new))
    flops = 2 * heads * pairs * (2 * rank + rope) + 2 * tokens * heads * rank * (nope + v_dim)
    return 2 * (context * (rank + rope) + kv_b), flops


def measure(args_of_step: tuple, device: str) -> tuple[float, float | None]:
    """Milliseconds of kiln's kernels and of the reference on one step (the cache written
    by the step each time: the same slots, so every call does the same work); the
    reference's is None where it does not fit in the GPU's memory."""
    from kiln.backends.cuda.mla_attention import paged_mla_attention

    def kiln_step():
        return paged_mla_attention(*args_of_step)

    def reference_step():
        return reference_mla(*args_of_step, None)

    if device == "cpu":
        return 1e3 * timed(kiln_step, device, repeat=2), 1e3 * timed(reference_step, device, repeat=2)
    import triton.testing

    kiln_step()
    kiln_ms = triton.testing.do_bench_cudagraph(kiln_step, rep=50, return_mode="median")
    try:
        reference_ms = triton.testing.do_bench(reference_step, warmup=5, rep=50, return_mode="median")
    except torch.OutOfMemoryError:  # the reference's dense mask over every (query, key) pair
        reference_ms = None
    torch.cuda.empty_cache()
    return kiln_ms, reference_ms


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    from kiln.backends.cuda.tuning import random_mla_step

    shape = SHAPES["tiny" if args.device == "cpu" else "deepseek-v3"]
    scale_down = 64 if args.device == "cpu" else 1
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16  # the interpreter's bf16 dots are wrong
    limits = hardware_limits(args.device)
    rows = []
    for name, (cached, new) in CASES.items():
        cached = [c // scale_down for c in cached][:max(1, len(cached) // scale_down)]
        new = [max(1, n // scale_down) for n in new][:len(cached)]
        step = random_mla_step(cached, new, shape["heads"], shape["nope"] + shape["rope"], shape["rank"],
                               shape["rope"], shape["heads"] * (shape["nope"] + shape["v_dim"]), dtype, args.device)
        kiln_ms, reference_ms = measure(step, args.device)
        nbytes, flops = step_cost(cached, new, **shape)
        per_s = 1e3 / kiln_ms
        rows.append({"case": name, "sequences": len(cached), "context": cached[0] + new[0], "new_tokens": sum(new),
                     "kiln_ms": kiln_ms, "reference_ms": reference_ms,
                     "speedup": reference_ms / kiln_ms if reference_ms is not None else None,
                     "bytes": nbytes, "tb_per_s": nbytes * per_s / 1e12,
                     "bandwidth_fraction": nbytes * per_s / limits.memory_bytes_per_s,
                     "tflop_per_s": flops * per_s / 1e12, "matmul_fraction": flops * per_s / limits.matmul_flops})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps({"hardware": asdict(limits), "shape": shape, "results": rows}, indent=2))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
