"""The CUDA backend's norm-quant kernels (``backends/cuda/norm_quant.py``) and
``scaled_linear`` (``backends/cuda/scaled_linear.py``) against the registry's reference
ops: under Triton's interpreter in float32 and float16 (INT8 codes, scales and residual
sums; E4M3 scales and sums), and on the GPU in bfloat16 (E4M3 codes too: the interpreter
rounds float32 to E4M3 wrongly near powers of two; ``torch._scaled_mm`` and
``torch._int_mm`` over the codes)."""

import pytest
import torch

from kiln.ir import REGISTRY, dtypes
from kiln.passes.quantization.weights import quantize_fp8_weight, quantize_int8

norm_quant = pytest.importorskip("kiln.backends.cuda.norm_quant")
from kiln.backends.cuda import scaled_linear  # noqa: E402
from kiln.backends.cuda.norms import NormConfig  # noqa: E402

GPU = pytest.mark.gpu
CPU_CASES = [("cpu", torch.float32, 1e-6), ("cpu", torch.float16, 1e-3)]


def _operands(rows, n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + rows + n)
    x, residual = ((torch.randn(rows, n, generator=gen) * 3).to(device, dtype) for _ in range(2))
    weight = (torch.rand(n, generator=gen) + 0.5).to(device, dtype)
    return x, residual, weight


def _run(x, residual, weight, qdtype, config=None):
    """(kernel's results, reference's results) of ``add_rms_norm_quant`` or, without a
    residual, ``rms_norm_quant``."""
    if residual is None:
        got = norm_quant.rms_norm_quant(x, weight, eps=1e-6, qdtype=qdtype, config=config)
        want = REGISTRY["rms_norm_quant"].reference(x.cpu(), None if weight is None else weight.cpu(), 1e-6, qdtype)
    else:
        got = norm_quant.add_rms_norm_quant(x, residual, weight, eps=1e-6, qdtype=qdtype, config=config)
        want = REGISTRY["add_rms_norm_quant"].reference(x.cpu(), residual.cpu(), weight.cpu(), 1e-6, qdtype)
    return [t.cpu() for t in got], want


def _check_scales_and_sum(got, want, tolerance):
    assert got[1].dtype == torch.float32 and got[1].shape == want[1].shape
    torch.testing.assert_close(got[1], want[1], rtol=tolerance, atol=0)
    if len(want) == 3:
        assert torch.equal(got[2], want[2])  # the residual sum, rounded to the input's dtype


def _check_int8_codes(got, want):
    """Codes equal but where the norm's output differs in its last bit (the row's sum of
    squares is taken in another order) and sits on a rounding boundary."""
    assert got.dtype == torch.int8 and got.shape == want.shape
    differ = (got.int() - want.int()).abs()
    assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
@pytest.mark.parametrize("rows, n, config", [(1, 64, None), (5, 96, None), (7, 200, NormConfig(2, 4))])
@pytest.mark.parametrize("with_residual", [True, False])
def test_int8_norm_quant_matches_the_reference(device, dtype, tolerance, rows, n, config, with_residual):
    x, residual, weight = _operands(rows, n, dtype, device)
    got, want = _run(x, residual if with_residual else None, weight, dtypes.int8, config)
    assert len(got) == len(want) == (3 if with_residual else 2)
    _check_int8_codes(got[0], want[0])
    _check_scales_and_sum(got, want, tolerance)


@pytest.mark.parametrize("device, dtype, tolerance", CPU_CASES)
def test_fp8_norm_quant_scales_and_sums(device, dtype, tolerance):
    x, residual, weight = _operands(6, 128, dtype, device)
    got, want = _run(x, residual, weight, dtypes.float8_e4m3fn)
    assert got[0].dtype == torch.float8_e4m3fn and got[0].shape == want[0].shape
    _check_scales_and_sum(got, want, tolerance)


def test_norm_quant_refuses_other_code_dtypes_and_takes_empty_inputs():
    x, _, weight = _operands(3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="E4M3 or INT8"):
        norm_quant.rms_norm_quant(x, weight, eps=1e-6, qdtype=dtypes.float16)
    codes, scales = norm_quant.rms_norm_quant(x[:0], weight, eps=1e-6, qdtype=dtypes.int8)
    assert codes.shape == (0, 64) and scales.shape == (0, 1)


@pytest.mark.parametrize("qdtype", [dtypes.float8_e4m3fn, dtypes.int8])
def test_the_kernel_table_runs_the_fused_ops_and_scaled_linear_falls_back_off_the_gpu(qdtype):
    from kiln.backends.cuda.kernels import cuda_kernels

    kernels = cuda_kernels("cpu")
    assert kernels["add_rms_norm_quant"] is norm_quant.add_rms_norm_quant
    assert kernels["scaled_linear"] is scaled_linear.scaled_linear
    x, _, weight = _operands(4, 64, torch.float32, "cpu")
    codes, scales = REGISTRY["rms_norm_quant"].reference(x, weight, 1e-6, qdtype)
    qweight, weight_scale = (quantize_fp8_weight if qdtype == dtypes.float8_e4m3fn else quantize_int8)(
        torch.randn(32, 64))
    want = REGISTRY["scaled_linear"].reference(codes, scales, qweight, weight_scale, None, dtypes.float32)
    assert torch.equal(scaled_linear.scaled_linear(codes, scales, qweight, weight_scale, dtype=dtypes.float32), want)


@GPU
@pytest.mark.parametrize("with_residual", [True, False])
def test_fp8_norm_quant_codes_on_the_gpu(with_residual):
    x, residual, weight = _operands(37, 4096, torch.bfloat16, "cuda")
    got, want = _run(x, residual if with_residual else None, weight, dtypes.float8_e4m3fn)
    _check_scales_and_sum(got, want, 1e-6)
    assert (got[0].float() == want[0].float()).float().mean() > 0.999


@GPU
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("qdtype", [dtypes.float8_e4m3fn, dtypes.int8])
def test_scaled_linear_on_the_gpu(rows, qdtype):
    """The norm's codes straight into ``torch._scaled_mm`` / ``torch._int_mm`` at one row
    (decode), a few and many, with a bias, against the unfused reference."""
    x, residual, weight = _operands(rows, 4096, torch.bfloat16, "cuda")
    w = torch.randn(1024, 4096, device="cuda") / 64
    qweight, weight_scale = (quantize_fp8_weight if qdtype == dtypes.float8_e4m3fn else quantize_int8)(w)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    codes, scales, _ = norm_quant.add_rms_norm_quant(x, residual, weight, eps=1e-6, qdtype=qdtype)
    got = scaled_linear.scaled_linear(codes, scales, qweight, weight_scale, bias, dtype=dtypes.bfloat16)
    want = REGISTRY["scaled_linear"].reference(codes, scales, qweight, weight_scale, bias.float(), dtypes.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1024)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
