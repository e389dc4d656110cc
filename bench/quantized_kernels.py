"""The quantized linear kernels alone, at the Llama-3.1-8B layer shapes, against bf16
cuBLAS and the HBM bandwidth measured in the same run: each GEMV candidate at one row
(bytes of the stored weight over time), and at more rows the Triton GEMM's candidates,
the dequantize-then-cuBLAS path and FP8's ``torch._scaled_mm``.

    python bench/quantized_kernels.py --out kernels.json [--rows 1 16 64 256 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from kiln.backends.cuda import quantized
from kiln.backends.cuda.quantized import QuantLinearConfig
from kiln.backends.cuda.configs import shape_key
from kiln.backends.cuda.gemv import gemv, gemv_configs
from kiln.backends.cuda.quantized_gemm import QuantGemmConfig
from kiln.backends.cuda.quantized_gemv import gemv_candidates
from kiln.passes.quantization.weights import quantize_fp8_weight, quantize_int4, quantize_int8
from kiln.runtime.benchmark import hardware_limits

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMMS = [QuantGemmConfig(*c) for c in ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (32, 128, 128, 4, 4),
                                       (16, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 256, 64, 8, 3),
                                       (16, 256, 64, 4, 4), (32, 64, 256, 4, 3))]


def ms(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (no host launch cost)."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def schemes(w: torch.Tensor) -> dict[str, tuple[str, list[torch.Tensor]]]:
    """scheme -> (op, stored operands)."""
    return {"int8": ("linear_int8", list(quantize_int8(w))),
            "int4": ("linear_int4", list(quantize_int4(w, 128, False))),
            "fp8": ("linear_fp8", [*quantize_fp8_weight(w), None])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    args = parser.parse_args()
    limits = hardware_limits("cuda")
    results = {"hardware": dataclasses.asdict(limits), "layers": []}
    print(f"HBM {limits.memory_bytes_per_s / 1e12:.3f} TB/s, bf16 {limits.matmul_flops / 1e12:.0f} TFLOP/s", flush=True)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        stored = schemes(w)
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"layer": name, "n": n, "k": k, "rows": rows, "bf16_cublas_ms": ms(lambda: F.linear(x, w))}
            if rows == 1:
                row["bf16_gemv_ms"] = min(ms(lambda c=c: gemv(x, w, None, c)) for c in gemv_configs())
            for scheme, (op, operands) in stored.items():
                launcher = getattr(quantized, op)
                weight_bytes = sum(t.numel() * t.element_size() for t in operands if t is not None)
                if rows == 1:
                    timed = {c: ms(lambda c=c: launcher(x, *operands, config={shape_key(n, k): QuantLinearConfig(
                        gemv=c)})) for c in gemv_candidates(4 if scheme == "int4" else 8)}
                    best = min(timed, key=timed.get)
                    row[scheme] = {"ms": timed[best], "config": dataclasses.asdict(best),
                                   "tb_per_s": weight_bytes / timed[best] / 1e9}
                elif scheme == "fp8":
                    row[scheme] = {"scaled_mm_ms": ms(lambda: launcher(x, *operands))}
                else:
                    gemm = {c: ms(lambda c=c: launcher(x, *operands, config={shape_key(n, k): QuantLinearConfig(
                        gemm=c, dequantize_from=1 << 30)})) for c in GEMMS}
                    best = min(gemm, key=gemm.get)
                    row[scheme] = {"gemm_ms": gemm[best], "gemm_config": dataclasses.asdict(best),
                                   "dequantize_ms": ms(lambda: launcher(x, *operands, config={
                                       shape_key(n, k): QuantLinearConfig(dequantize_from=2)}))}
            results["layers"].append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
