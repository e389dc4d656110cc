"""The CUDA backend's quantized linear layers against the registry's reference ops: the
weight-only INT8 (with and without zero points) and INT4 GEMV (one row), GEMM (more rows)
and dequantized-weight path (many rows) under Triton's interpreter at small shapes in
float32 and float16, and on the GPU at Llama-3.1-8B's shapes in bfloat16, with FP8's GEMV
and ``torch._scaled_mm``.

Triton's interpreter rounds float32 to E4M3 wrongly near powers of two (127.2 becomes
64), so the kernels that round activations into FP8 are checked on the GPU only."""

import pytest
import torch

from kiln.ir import REGISTRY
from kiln.passes.quantization.weights import pack_int4_codes, quantize_fp8_weight, quantize_int4, quantize_int8

quantized = pytest.importorskip("kiln.backends.cuda.quantized")
from kiln.backends.cuda import fp8, quantized_gemm, quantized_gemv  # noqa: E402
from kiln.backends.cuda.configs import shape_key  # noqa: E402

GPU = pytest.mark.gpu
CPU_CASES = [("cpu", torch.float32, 1e-5), ("cpu", torch.float16, 2e-3)]
GPU_CASES = [pytest.param("cuda", torch.bfloat16, 1e-2, marks=GPU)]


def _problem(rows, n, k, dtype, device, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed + rows + n + k)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g).to(device, dtype) if with_bias else None
    return x, w, bias


def _relative(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _check(op, x, operands, bias, tolerance, **config):
    """The kernel's result has the reference's shape and dtype and matches it, computed
    in float32 from the same stored operands."""
    # the optional operand before the bias (INT8's zero points, FP8's static input scale) where not given
    absent = [None] * (3 - len(operands)) if op in ("linear_fp8", "linear_int8") else []
    want = REGISTRY[op].reference(x.float().cpu(), *[o.cpu() for o in operands], *absent,
                                  None if bias is None else bias.float().cpu())
    got = getattr(quantized, op)(x, *operands, *absent, bias, **config)
    assert got.shape == x.shape[:-1] + (want.shape[-1],) and got.dtype == x.dtype
    assert _relative(got.cpu(), want) < tolerance


def _int8_with_zeros(w, group):
    """``w`` rounded to 5-bit codes (0..31, int8) with a float32 scale and zero point per row
    and group of ``group`` inputs: GGUF's Q5_1 and Q5_K in kiln's layout."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 31).clamp(min=1e-8)
    zeros = -low / scale
    codes = (groups / scale[..., None] + zeros[..., None]).round().clamp(0, 31).to(torch.int8).view(n, k)
    return codes, scale, zeros


def _small_tiles(n, k, dequantize_from=512):
    """A stored configuration of small tiles for the interpreter's shapes."""
    return quantized.per_shape({shape_key(n, k): {"gemv": {"block_n": 16, "block_k": 64, "groups_per_tile": 2},
                                                  "gemm": {"block_m": 32, "block_n": 32, "block_k": 64},
                                                  "dequantize_from": dequantize_from}})


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
@pytest.mark.parametrize("rows, n, k, dequantize_from", [(1, 40, 96, 512), (1, 64, 256, 512), (5, 40, 96, 512),
                                                         (33, 48, 256, 512), (33, 48, 256, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_kernels_match_the_reference(device, dtype, tolerance, rows, n, k, dequantize_from, with_bias):
    x, w, bias = _problem(rows, n, k, dtype, device, with_bias)
    codes, scale = quantize_int8(w)
    _check("linear_int8", x, (codes.to(device), scale.to(device)), bias, tolerance,
           config=_small_tiles(n, k, dequantize_from))


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("rows, n, k, group, dequantize_from", [(1, 40, 256, 32, 512), (5, 40, 256, 32, 512),
                                                                (33, 48, 256, 16, 16)])
def test_int8_kernels_with_zero_points_match_the_reference(device, dtype, tolerance, rows, n, k, group,
                                                           dequantize_from):
    """INT8 codes with grouped scales and float zero points (GGUF's Q5_1 and Q5_K): the GEMV,
    the GEMM and the dequantized weight."""
    x, w, bias = _problem(rows, n, k, dtype, device, with_bias=rows == 5)
    parts = [t.to(device) for t in _int8_with_zeros(w, group)]
    _check("linear_int8", x, parts, bias, tolerance, config=_small_tiles(n, k, dequantize_from))


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
@pytest.mark.parametrize("rows, n, k, group, dequantize_from", [
    (1, 40, 192, 96, 512), (1, 64, 256, 128, 512), (1, 40, 384, 64, 512), (4, 40, 192, 96, 512),
    (33, 48, 256, 64, 512), (33, 48, 256, 64, 8)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_kernels_match_the_reference(device, dtype, tolerance, rows, n, k, group, dequantize_from, symmetric):
    x, w, bias = _problem(rows, n, k, dtype, device, with_bias=rows == 4)
    parts = [t.to(device) for t in quantize_int4(w.to(dtype), group, symmetric)]
    _check("linear_int4", x, parts, bias, tolerance, config=_small_tiles(n, k, dequantize_from))


def _grouped_problem(n, k, group, seed=0):
    """Random INT8 codes with a float32 scale per (row, group of ``group`` inputs), random
    5-bit codes (INT8) and 4-bit codes with float zero points (GGUF's Q8_0, Q5_1 and Q4_1 in
    kiln's layout), each with the float32 weight it stands for."""
    g = torch.Generator().manual_seed(seed)
    codes8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale8 = torch.rand(n, k // group, generator=g) / 100
    w8 = (codes8.float().view(n, -1, group) * scale8[..., None]).view(n, k)
    with_zeros = []
    for high, dtype in ((32, torch.int8), (16, torch.uint8)):
        codes = torch.randint(0, high, (n, k), generator=g, dtype=dtype)
        scale = torch.rand(n, k // group, generator=g) / 10
        zero = torch.rand(n, k // group, generator=g) * (high - 1)
        w = ((codes.float().view(n, -1, group) - zero[..., None]) * scale[..., None]).view(n, k)
        with_zeros.append((codes if dtype == torch.int8 else pack_int4_codes(codes), scale, zero, w))
    return (codes8, scale8, w8), *with_zeros


@pytest.mark.parametrize("rows", [1, 6])
def test_grouped_int8_scales_and_float_zero_points(rows):
    """The kernels' grouped INT8 scales, with and without float zero points, and float INT4
    zero points (the layouts GGUF checkpoints repack into) against the weights they stand for."""
    n, k, group = 24, 256, 32
    (codes8, scale8, w8), (codes5, scale5, zero5, w5), (packed4, scale4, zero4, w4) = _grouped_problem(n, k, group)
    x = torch.randn(rows, k)
    gemv_config = quantized_gemv.QuantGemvConfig(8, 64, 2)
    gemm_config = quantized_gemm.QuantGemmConfig(16, 16, 64)
    for w, operands in ((w8, (codes8, scale8, None)), (w5, (codes5, scale5, zero5)), (w4, (packed4, scale4, zero4))):
        got = (quantized_gemv.integer_gemv(x, *operands, None, gemv_config) if rows == 1 else
               quantized_gemm.weight_only_gemm(x, *operands, None, gemm_config))
        assert _relative(got, x @ w.T) < 1e-5
    assert torch.equal(quantized_gemm.dequantize(codes8, scale8, None, torch.float32), w8)
    for codes, scale, zero, w in ((codes5, scale5, zero5, w5), (packed4, scale4, zero4, w4)):
        assert _relative(quantized_gemm.dequantize(codes, scale, zero, torch.float32), w) < 1e-6


@pytest.mark.parametrize("bits, zero", [(8, None), (8, 5.0), (4, 0.0)])
def test_the_gemv_reads_every_code_exactly(bits, zero):
    """Every code value at every position of its int32 word comes out exactly: with unit
    scales, integer zero points and small integer inputs the GEMV's result is an exact
    integer sum."""
    n, k = 8, 64
    g = torch.Generator().manual_seed(bits)
    if bits == 8:
        codes = torch.arange(-128, 128, dtype=torch.int8)[torch.randperm(256, generator=g)].repeat(2).view(n, k)
        qweight = codes
    else:
        codes = torch.arange(16, dtype=torch.uint8).repeat(n * k // 16)[torch.randperm(n * k, generator=g)].view(n, k)
        qweight = pack_int4_codes(codes)
    scales, zeros = (torch.ones(n), None) if zero is None else (torch.ones(n, 1), torch.full((n, 1), zero))
    x = torch.arange(1, k + 1, dtype=torch.float32)[None, :]
    got = quantized_gemv.integer_gemv(x, qweight, scales, zeros, None, quantized_gemv.QuantGemvConfig(4, 32, 1))
    assert torch.equal(got, x @ (codes.float() - (zero or 0.0)).T)


def test_the_fp8_gemv_takes_a_row_of_e4m3_codes():
    """``scaled_linear``'s one row: E4M3 codes and their scale, made by the norm before it,
    go into the FP8 GEMV as they are (``fp8_gemv`` with a float8 input)."""
    from kiln.ir import dtypes

    n, k = 40, 256
    g = torch.Generator().manual_seed(3)
    codes = (torch.randn(1, k, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.02]])
    qweight, weight_scale = quantize_fp8_weight(torch.randn(n, k, generator=g) / 16)
    bias = torch.randn(n, generator=g)
    got = quantized_gemv.fp8_gemv(codes, qweight, weight_scale, scale, bias, quantized_gemv.QuantGemvConfig(8, 64),
                                  torch.float32)
    want = REGISTRY["scaled_linear"].reference(codes, scale, qweight, weight_scale, bias, dtypes.float32)
    assert got.dtype == torch.float32 and _relative(got, want) < 1e-6


@pytest.mark.parametrize("device, dtype, tolerance", GPU_CASES)
@pytest.mark.parametrize("rows", [1, 7, 512])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_kernels_at_llama_shapes_on_the_gpu(device, dtype, tolerance, rows, n, k):
    x, w, _ = _problem(rows, n, k, dtype, device, with_bias=False)
    _check("linear_int8", x, [t.to(device) for t in quantize_int8(w)], None, tolerance)
    _check("linear_int8", x, [t.to(device) for t in _int8_with_zeros(w, 32)], None, tolerance)
    _check("linear_int4", x, [t.to(device) for t in quantize_int4(w.to(dtype), 128, False)], None, tolerance)
    _check("linear_fp8", x, [t.to(device) for t in quantize_fp8_weight(w)], None, 2e-2)


@GPU
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_gemv_and_scaled_mm(rows, static):
    """One row: the GEMV rounds the row into E4M3 as the reference does; more rows: one
    quantizing kernel, then ``torch._scaled_mm`` with per-token and per-channel scales."""
    x, w, bias = _problem(rows, 256, 512, torch.bfloat16, "cuda", with_bias=True)
    codes, scale = (t.cuda() for t in quantize_fp8_weight(w))
    input_scale = (x.float().abs().amax() / 300).reshape(()) if static else None
    got = quantized.linear_fp8(x, codes, scale, input_scale, bias)
    want = REGISTRY["linear_fp8"].reference(x.float(), codes, scale, input_scale, bias.float())
    assert got.dtype == torch.bfloat16 and _relative(got, want) < 1e-2


@GPU
def test_fp8_row_quantization_matches_the_reference():
    from kiln.ir.opdefs.quantized import fp8_token_scales, quantize_fp8

    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) * 5
    codes, scales = fp8.quantize_rows(x)
    want_scales = fp8_token_scales(x)
    assert torch.equal(scales, want_scales)
    assert (codes.float() == quantize_fp8(x, want_scales).float()).float().mean() > 0.999


def test_the_kernel_table_takes_stored_configurations():
    from kiln.backends.cuda.kernels import cuda_kernels

    stored = {"4096x4096": {"gemv": {"block_n": 8, "block_k": 128}, "dequantize_from": 64}}
    kernels = cuda_kernels("cpu", {"linear_int4": stored})
    assert kernels["linear_int4"].keywords["config"] == quantized.per_shape(stored)
    assert quantized.linear_config(quantized.per_shape(stored), 4096, 4096) == quantized.QuantLinearConfig(
        gemv=quantized.QuantGemvConfig(block_n=8, block_k=128), dequantize_from=64)
    assert quantized.linear_config(quantized.per_shape(stored), 4096, 1024) == quantized.QuantLinearConfig()
    assert kernels["linear_int8"] is quantized.linear_int8 and kernels["linear_fp8"] is quantized.linear_fp8


@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=GPU),  # int8's kernels: tested above
                                    pytest.param("fp8", marks=GPU)])  # with the norms' E4M3 codes (norm_quant.py)
def test_quantized_engines_step_with_the_cuda_kernels(scheme):
    """The bundled model quantized for the cuda target: a mixed prefill step and a decode
    step through the CUDA kernel table give the reference kernels' logits (on the CPU,
    only the quantized layers run interpreted, to keep the test fast)."""
    import warnings

    import kiln
    from hf_models import BUNDLED

    from kiln.backends import reference_kernels
    from kiln.backends.cuda.kernels import cuda_kernels
    from kiln.runtime.batch import SequenceStep, step_inputs
    from kiln.runtime.executor import load_executor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # built without the target GPU: default launch parameters
        engine = kiln.compile(str(BUNDLED), target="cuda", max_batch_size=4, max_seq_len=64, quantization=scheme)
    kernels = cuda_kernels(device) if device == "cuda" else {**reference_kernels(device), f"linear_{scheme}": getattr(
        quantized, f"linear_{scheme}")}
    fast = load_executor(engine.executor_source, "executor.py", engine.weights(device), kernels)
    reference = engine.step_function(device)
    caches = [engine.cache_spec.allocate(6, 16, device) for _ in range(2)]
    steps = [SequenceStep([5, 9, 13, 200, 7, 1, 2, 3], 0, [3]), SequenceStep([33, 34], 0, [1])]
    for _ in range(2):
        inputs = {k: v.to(device) for k, v in step_inputs(steps, 16).items()}
        got, want = (step(**inputs, **c)[0] for step, c in zip((fast, reference), caches))
        assert _relative(got, want) < (1e-4 if device == "cpu" else 1e-2)  # the GPU's float32 tl.dot is TF32
        tokens = want.argmax(-1).tolist()
        steps = [SequenceStep([t], s.cached + len(s.token_ids), s.blocks) for s, t in zip(steps, tokens)]
