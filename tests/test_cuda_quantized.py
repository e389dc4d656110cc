"""The CUDA backend's quantized linear layers against the registry's reference ops: the
weight-only INT8 and INT4 GEMV (one row) and GEMM (more rows) under Triton's interpreter
at small shapes in float32 and float16, and on the GPU at Llama-3.1-8B's shapes in
bfloat16, with FP8 through ``torch._scaled_mm``."""

import pytest
import torch

from kiln.ir import REGISTRY
from kiln.passes.quantization.weights import quantize_fp8_weight, quantize_int4, quantize_int8

quantized = pytest.importorskip("kiln.backends.cuda.quantized")

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
    want = REGISTRY[op].reference(x.float().cpu(), *[o.cpu() for o in operands],
                                  *([None] if op == "linear_fp8" else []),
                                  None if bias is None else bias.float().cpu())
    got = getattr(quantized, op)(x, *operands, *([None] if op == "linear_fp8" else []), bias, **config)
    assert got.shape == x.shape[:-1] + (want.shape[-1],) and got.dtype == x.dtype
    assert _relative(got.cpu(), want) < tolerance


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
@pytest.mark.parametrize("rows, n, k", [(1, 40, 96), (1, 64, 256), (5, 40, 96), (33, 48, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_kernels_match_the_reference(device, dtype, tolerance, rows, n, k, with_bias):
    x, w, bias = _problem(rows, n, k, dtype, device, with_bias)
    codes, scale = quantize_int8(w)
    _check("linear_int8", x, (codes.to(device), scale.to(device)), bias, tolerance,
           config=quantized.QuantLinearConfig(quantized.QuantGemvConfig(16, 64), quantized.QuantGemmConfig(32, 32, 32)))


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
@pytest.mark.parametrize("rows, n, k, group", [(1, 40, 192, 96), (1, 64, 256, 128), (4, 40, 192, 96),
                                               (33, 48, 256, 64)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_kernels_match_the_reference(device, dtype, tolerance, rows, n, k, group, symmetric):
    x, w, bias = _problem(rows, n, k, dtype, device, with_bias=rows == 4)
    parts = [t.to(device) for t in quantize_int4(w.to(dtype), group, symmetric)]
    _check("linear_int4", x, parts, bias, tolerance,
           config=quantized.QuantLinearConfig(quantized.QuantGemvConfig(16, 64), quantized.QuantGemmConfig(32, 32, 64)))


@pytest.mark.parametrize("device, dtype, tolerance", GPU_CASES)
@pytest.mark.parametrize("rows", [1, 7, 512])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_kernels_at_llama_shapes_on_the_gpu(device, dtype, tolerance, rows, n, k):
    x, w, _ = _problem(rows, n, k, dtype, device, with_bias=False)
    _check("linear_int8", x, [t.to(device) for t in quantize_int8(w)], None, tolerance)
    _check("linear_int4", x, [t.to(device) for t in quantize_int4(w.to(dtype), 128, False)], None, tolerance)
    _check("linear_fp8", x, [t.to(device) for t in quantize_fp8_weight(w)], None, 2e-2)


@GPU
def test_fp8_uses_scaled_mm_per_token_and_channel():
    x, w, bias = _problem(64, 256, 512, torch.bfloat16, "cuda", with_bias=True)
    codes, scale = (t.cuda() for t in quantize_fp8_weight(w))
    got = quantized.linear_fp8(x, codes, scale, None, bias)
    want = REGISTRY["linear_fp8"].reference(x.float(), codes, scale, None, bias.float())
    assert got.dtype == torch.bfloat16 and _relative(got, want) < 1e-2


def test_the_kernel_table_takes_stored_configurations():
    from kiln.backends.cuda.kernels import cuda_kernels

    kernels = cuda_kernels("cpu", {"linear_int4": {"gemv": {"block_n": 8, "block_k": 128}}})
    assert kernels["linear_int4"].keywords["config"] == quantized.QuantLinearConfig(
        gemv=quantized.QuantGemvConfig(block_n=8, block_k=128))
    assert kernels["linear_int8"] is quantized.linear_int8 and kernels["linear_fp8"] is quantized.linear_fp8


@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=GPU)])  # int8's kernels: tested above
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
