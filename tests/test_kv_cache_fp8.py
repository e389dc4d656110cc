"""The FP8 KV cache (``kv_cache_dtype="fp8"``): the pass retypes the paged caches, the
reference op and the reference backend store E4M3 and read it back exactly as a wide
cache of E4M3-rounded keys and values would, and engines serve with a quarter of the
float32 cache bytes per token."""

import pytest
import torch
from hf_models import BUNDLED

import kiln
from kiln.backends.reference import paged_attention as backend_paged_attention
from kiln.frontends.huggingface import load_checkpoint
from kiln.ir import REGISTRY, dtypes, verify
from kiln.passes import fp8_kv_cache, pipeline_manager


def _attention_inputs(seed=0, block_size=4, blocks=6):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(5, h, 8, generator=gen) * 3 for h in (4, 2, 2))
    query_start, context_lens = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([3, 6], dtype=torch.int32)
    block_tables = torch.tensor([[2, 0], [5, 1]], dtype=torch.int32)
    slot_mapping = torch.tensor([8, 9, 10, 22, 23])  # sequence 1 brings positions 4 and 5 (block 5's 2, 3)
    cache = torch.randn(blocks, block_size, 2, 8, generator=gen) * 3
    return q, k, v, cache, cache.flip(0), slot_mapping, query_start, context_lens, block_tables


def _rounded(t):
    return t.to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("implementation", ["registry", "backend"])
def test_fp8_cache_equals_a_wide_cache_of_rounded_values(implementation):
    q, k, v, k_cache, v_cache, *meta = _attention_inputs()
    run = REGISTRY["paged_attention"].reference if implementation == "registry" else backend_paged_attention
    attrs = dict(scale=None, sliding_window=None, softcap=None)
    out, k8, v8 = run(q, k, v, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), *meta, **attrs)
    expected, k32, v32 = run(q, _rounded(k), _rounded(v), _rounded(k_cache), _rounded(v_cache), *meta, **attrs)
    assert k8.dtype == torch.float8_e4m3fn and torch.equal(k8.float(), k32) and torch.equal(v8.float(), v32)
    torch.testing.assert_close(out, expected)


def test_fp8_cache_saturates_instead_of_overflowing():
    q, k, v, k_cache, v_cache, *meta = _attention_inputs()
    k = k * 1000
    _, k8, _ = REGISTRY["paged_attention"].reference(q, k, v, k_cache.to(torch.float8_e4m3fn),
                                                     v_cache.to(torch.float8_e4m3fn), *meta, scale=None,
                                                     sliding_window=None, softcap=None)
    assert k8.float().isfinite().all() and k8.float().abs().max() == 448


def test_the_pass_retypes_every_cache_once():
    graph = load_checkpoint(str(BUNDLED)).graph
    pipeline_manager("reference", kv_cache_dtype="fp8", debug=True).run(graph)
    caches = [v for v in graph.inputs if "cache" in v.name]
    assert len(caches) == 8 and all(v.dtype == dtypes.float8_e4m3fn for v in caches)
    assert all(v.dtype == dtypes.float8_e4m3fn for v in graph.outputs[1:])
    assert fp8_kv_cache(graph) == 0
    verify(graph)


def test_engines_serve_from_an_fp8_cache(bundled_engine, tmp_path):
    engine = kiln.compile(str(BUNDLED), max_batch_size=4, max_seq_len=128, kv_cache_dtype="fp8")
    engine.save(tmp_path / "e")
    engine = kiln.load(tmp_path / "e")
    assert engine.info.kv_cache_dtype == "fp8" and engine.cache_spec.dtype == torch.float8_e4m3fn
    assert engine.cache_spec.bytes_per_token() * 4 == bundled_engine.cache_spec.bytes_per_token()  # vs float32
    params = kiln.SamplingParams(max_tokens=16, temperature=0)
    prompts = ["The for statement", "Python uses the"]
    fp8 = kiln.LLM(engine).generate(prompts, params)
    full = kiln.LLM(bundled_engine).generate(prompts, params)
    assert [o.finish_reason for o in fp8] == ["length", "length"]
    assert [o.token_ids for o in fp8] == [o.token_ids for o in full]  # measured: 16 of 16 on both


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="'int8' is not one of 'auto'"):
        kiln.compile(str(BUNDLED), kv_cache_dtype="int8")



def test_gpu_targets_build_an_fp8_cache():
    """The CUDA attention kernels read and write E4M3 caches (checked against the
    reference in tests/test_cuda_attention.py on the GPU)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # built without the target GPU: default launch parameters
        engine = kiln.compile(str(BUNDLED), target="h100", max_batch_size=2, max_seq_len=64, kv_cache_dtype="fp8")
    assert engine.cache_spec.dtype == torch.float8_e4m3fn
