"""The CUDA backend's ``linear_w8a8`` (``backends/cuda/int8_mm.py``) against the registry's
reference: on the CPU, where ``torch._int_mm`` runs too, the launcher's rounding, row
padding and fallback; on the GPU (``pytest -m gpu``) at Llama-3.1-8B's shapes in
bfloat16, and a SmoothQuant engine's steps through the CUDA kernel table."""

import pytest
import torch

from kiln.backends.cuda import int8_mm
from kiln.ir import REGISTRY
from kiln.passes.quantization.weights import quantize_int8

GPU = pytest.mark.gpu


def _problem(rows, n, k, dtype, device, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed + rows + n + k)
    x = torch.randn(rows, k, generator=g)
    x[:, :3] *= 30  # outlier channels, as real activations have
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g).to(device, dtype) if with_bias else None
    qweight, scale = (t.to(device) for t in quantize_int8(w))
    return x.to(device, dtype), qweight, scale, bias


def _reference(x, qweight, scale, bias):
    return REGISTRY["linear_w8a8"].reference(x.float().cpu(), qweight.cpu(), scale.cpu(),
                                             None if bias is None else bias.float().cpu())


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_launcher_matches_the_reference_on_the_cpu(rows, with_bias):
    x, qweight, scale, bias = _problem(rows, 48, 96, torch.float32, "cpu", with_bias)
    got = int8_mm.linear_w8a8(x.view(1, rows, 96), qweight, scale, bias)
    assert got.shape == (1, rows, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.view(rows, 48), _reference(x, qweight, scale, bias), rtol=1e-6, atol=1e-5)


def test_few_rows_are_padded_to_what_int_mm_takes():
    assert [int8_mm.int_mm_rows(r) for r in (1, 16, 17, 300)] == [17, 17, 17, 300]


def test_dims_int_mm_cannot_take_run_the_reference():
    x, qweight, scale, bias = _problem(3, 42, 90, torch.float32, "cpu", True)
    torch.testing.assert_close(int8_mm.linear_w8a8(x, qweight, scale, bias), _reference(x, qweight, scale, bias))


def test_the_cuda_kernel_table_runs_linear_w8a8_with_int_mm():
    from kiln.backends.cuda.kernels import cuda_kernels

    assert cuda_kernels("cpu")["linear_w8a8"] is int8_mm.linear_w8a8


@GPU
@pytest.mark.parametrize("rows", [1, 7, 512])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_int_mm_at_llama_shapes_on_the_gpu(rows, n, k):
    x, qweight, scale, bias = _problem(rows, n, k, torch.bfloat16, "cuda", with_bias=False)
    got = int8_mm.linear_w8a8(x, qweight, scale, bias)
    want = _reference(x, qweight, scale, bias)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert ((got.float().cpu() - want).norm() / want.norm()).item() < 1e-2  # bf16 rounding of the output


@GPU
def test_a_smoothquant_engine_steps_with_the_cuda_kernels():
    """The bundled model with w8a8_sq for the cuda target: prefill and decode steps
    through the CUDA kernel table give the reference kernels' logits."""
    import warnings

    from hf_models import BUNDLED

    import kiln
    from kiln.backends.cuda.kernels import cuda_kernels
    from kiln.passes.quantization import default_corpus
    from kiln.runtime.batch import SequenceStep, step_inputs
    from kiln.runtime.executor import load_executor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # built without tuning for this GPU: default launch parameters
        engine = kiln.compile(str(BUNDLED), target="cuda", max_batch_size=4, max_seq_len=64, quantization="w8a8_sq",
                              calibration=default_corpus(4))
    fast = load_executor(engine.executor_source, "executor.py", engine.weights("cuda"), cuda_kernels("cuda"))
    reference = engine.step_function("cuda")
    caches = [engine.cache_spec.allocate(6, 16, "cuda") for _ in range(2)]
    steps = [SequenceStep([5, 9, 13, 200, 7, 1, 2, 3], 0, [3]), SequenceStep([33, 34], 0, [1])]
    for _ in range(2):
        inputs = {k: v.to("cuda") for k, v in step_inputs(steps, 16).items()}
        got, want = (step(**inputs, **c)[0] for step, c in zip((fast, reference), caches))
        assert ((got - want).norm() / want.norm()).item() < 1e-2
        tokens = want.argmax(-1).tolist()
        steps = [SequenceStep([t], s.cached + len(s.token_ids), s.blocks) for s, t in zip(steps, tokens)]
