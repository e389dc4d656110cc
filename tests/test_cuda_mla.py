"""The Triton multi-head latent attention against the registry's reference op: decode
(split and unsplit contexts, heads in several blocks), prefill, chunked prefill over a
cached prefix and mixed steps, blocks out of order in a NaN-filled cache, padded tokens;
the latent cache write. Small shapes in float32 and float16 on the CPU (Triton's
interpreter), DeepSeek-V3's (128 heads, rank 512, rope 64) in bfloat16 on a GPU. Then a
tiny DeepSeek-V3 built for the ``cuda`` target: its step with the CUDA kernels gives the
reference backend's logits, and on a GPU it serves with CUDA graphs."""

import contextlib

import pytest
import torch
from hf_models import random_model, write_checkpoint
from test_cuda_attention import make_step

import kiln
from kiln.backends import reference_kernels
from kiln.ir import REGISTRY
from kiln.runtime import LLM, RuntimeConfig, SamplingParams
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.runtime.executor import load_executor

mla = pytest.importorskip("kiln.backends.cuda.mla_attention")
cuda_kernels = pytest.importorskip("kiln.backends.cuda.kernels").cuda_kernels

GPU = pytest.mark.gpu
SMALL = dict(heads=4, nope=16, rope=8, v_dim=16, rank=32)
DEEPSEEK_V3 = dict(heads=128, nope=128, rope=64, v_dim=128, rank=512)


def latent_step(query_lens, cached_lens, heads, nope, rope, v_dim, rank, block_size=16, dtype=torch.float32,
                device="cpu", seed=0):
    """A random step over a latent cache: the paged layout of ``make_step`` with one key
    head of width ``rank + rope`` (the cache rows, then the step's latents and rotated
    keys), and queries and ``kv_b`` of the given head shape."""
    _, rows, _, cache, _, *meta = make_step(query_lens, cached_lens, 1, 1, rank + rope, block_size, dtype, device,
                                            seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(rows.shape[0], heads, nope + rope, generator=gen).to(dtype=dtype, device=device)
    kv_b = (torch.randn(heads * (nope + v_dim), rank, generator=gen) * rank ** -0.5).to(dtype=dtype, device=device)
    return (q, rows[..., :rank], rows[..., rank:], kv_b, cache, *meta)


def check(query_lens, cached_lens, shape=SMALL, block_size=16, dtype=torch.float32, device="cpu", scale=None,
          config=None, tolerance=2e-3):
    args = latent_step(query_lens, cached_lens, **shape, block_size=block_size, dtype=dtype, device=device)
    want, want_cache = REGISTRY["paged_mla_attention"].reference(*(a.float() for a in args[:5]), *args[5:],
                                                                 scale=scale)
    cache = args[4]
    out, out_cache = mla.paged_mla_attention(*args, scale=scale, config=config)
    assert out_cache is cache and out.shape == want.shape and out.dtype == dtype
    written = ~torch.isnan(want_cache)
    assert torch.equal(cache.float()[written], want_cache[written])  # the rows as given, nothing else
    assert torch.isnan(cache.float()[~written]).all()
    error = (out.float() - want).norm() / want.norm()
    assert error < tolerance, error


CPU_CASES = {
    "decode": ([1, 1, 1], [5, 40, 17]),
    "decode of many sequences": ([1] * 9, [5, 40, 17, 0, 70, 2, 33, 9, 1]),  # one split each
    "prefill": ([7, 20], [0, 0]),
    "chunked prefill over a cached prefix": ([9, 3], [33, 16]),
    "mixed": ([1, 12, 1, 5], [30, 0, 64, 11]),
}


@pytest.mark.parametrize("case", CPU_CASES)
def test_matches_the_reference(case):
    check(*CPU_CASES[case])


def test_decode_splits_long_contexts_and_heads_in_blocks():
    splits = mla.MlaConfig(decode=mla.MlaDecodeConfig(block_n=16, num_splits=3))
    check([1, 1], [70, 3], config=splits, scale=0.3)
    shape = {**SMALL, "heads": 20}  # two blocks of 16 heads, the second partly empty
    check([1, 1], [70, 3], shape=shape, config=splits, block_size=8)
    check([1], [40], shape={**SMALL, "rank": 160}, config=splits)  # merged in two blocks of 128 features
    wide_blocks = mla.MlaConfig(decode=mla.MlaDecodeConfig(block_h=64, block_n=16, num_splits=2))
    check([1, 1], [30, 7], shape=shape, config=wide_blocks)  # one block of 32 heads (20 of them real)
    check([5, 1], [20, 9], shape=shape, config=mla.MlaConfig(prefill=mla.MlaPrefillConfig(block_q=1, block_n=16)))


def test_float16_odd_sizes_and_blocks():
    shape = dict(heads=3, nope=12, rope=6, v_dim=10, rank=24)
    check([1, 1], [9, 20], shape=shape, dtype=torch.float16, block_size=8, tolerance=1e-2)
    check([6, 2], [3, 0], shape=shape, dtype=torch.float16, block_size=1, tolerance=1e-2)


def test_negative_slots_and_padded_tokens_write_nothing():
    """A padded decode sequence (slot -1) and, in a mixed step, tokens past the last
    sequence (as a token bucket pads them) leave the cache alone; the real tokens' output
    is unchanged by them."""
    args = list(latent_step([1, 1], [4, 6], **SMALL))
    args[5] = torch.tensor([-1, int(args[5][1])])
    before = args[4].clone()
    mla.paged_mla_attention(*args)
    changed = ~((args[4] == before) | (args[4].isnan() & before.isnan()))
    assert changed.sum() == SMALL["rank"] + SMALL["rope"]  # the second sequence's token only

    args = list(latent_step([3, 2], [5, 0], **SMALL))
    unpadded = mla.paged_mla_attention(*args[:4], args[4].clone(), *args[5:])[0]
    pad = 4
    for i in range(3):  # q, latent, k_rope gain rows that no sequence owns
        args[i] = torch.cat([args[i], torch.randn(pad, *args[i].shape[1:])])
    args[5] = torch.cat([args[5], torch.full((pad,), -1)])
    before = args[4].clone()
    out, cache = mla.paged_mla_attention(*args)
    torch.testing.assert_close(out[:5], unpadded, rtol=1e-5, atol=1e-5)
    written = ~(cache.isnan() & before.isnan()) & (cache != before)
    assert written.sum() == 5 * (SMALL["rank"] + SMALL["rope"])


def test_a_cache_of_another_layout_is_refused():
    args = list(latent_step([1], [3], **SMALL))
    args[4] = args[4][..., :-1]
    with pytest.raises(ValueError, match=r"needs a cache \[num_blocks, block_size, 1, 40\] of torch.float32"):
        mla.paged_mla_attention(*args)


@GPU
@pytest.mark.parametrize("case", ["decode", "decode of one long context", "prefill", "chunked", "mixed"])
def test_deepseek_v3_shapes_in_bfloat16(case):
    gen = torch.Generator().manual_seed(1)
    shapes = {"decode": ([1] * 64, torch.randint(1, 3000, (64,), generator=gen).tolist()),
              "decode of one long context": ([1], [8000]),
              "prefill": ([2048], [0]), "chunked": ([512, 300], [1024, 77]),
              "mixed": ([1] * 30 + [700, 1], torch.randint(1, 900, (30,), generator=gen).tolist() + [0, 4000])}[case]
    check(*shapes, shape=DEEPSEEK_V3, dtype=torch.bfloat16, device="cuda", scale=0.1147, tolerance=2e-2)


@GPU
def test_a_decode_step_replays_from_a_cuda_graph():
    args = latent_step([1] * 8, [100, 3, 2500, 1, 64, 999, 31, 500], **DEEPSEEK_V3, dtype=torch.bfloat16,
                       device="cuda")
    eager = mla.paged_mla_attention(*args[:4], args[4].clone(), *args[5:])[0].clone()
    mla.paged_mla_attention(*args[:4], args[4].clone(), *args[5:])  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = mla.paged_mla_attention(*args)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.fixture(scope="module")
def deepseek_cuda(tmp_path_factory):
    """A tiny random DeepSeek-V3 (2 layers, 4 heads, rank 32, rope 8; a dense layer, then
    experts) built for the ``cuda`` target in float32."""
    path = write_checkpoint(random_model("deepseek-v3"), tmp_path_factory.mktemp("deepseek-v3"))
    untuned = pytest.warns(UserWarning, match="not tuned") if not torch.cuda.is_available() else \
        contextlib.nullcontext()
    with untuned:
        return kiln.compile(path, target="cuda", dtype="float32", max_seq_len=64)


def _logits_of_steps(engine, device: str, kernels) -> list[torch.Tensor]:
    """The logits of a mixed step (a prefill, a prefill over blocks out of order, a short
    prompt) and two decode steps after it (of given tokens, so that every run sees the
    same inputs), block size 4."""
    step = load_executor(engine.executor_source, "executor.py", engine.weights(device), kernels)
    caches = engine.cache_spec.allocate(16, 4, device)
    state = [SequenceStep([5, 9, 13, 200, 7, 1, 2, 3, 4, 5, 6], 0, [3, 0, 9, 12]), SequenceStep([33, 34], 0, [7]),
             SequenceStep([100, 7, 7, 1000, 9], 0, [1, 10])]
    logits = []
    for decoded in ([40, 41, 42], [50, 51, 52], None):
        inputs = {k: v.to(device) for k, v in step_inputs(state, 4).items()}
        logits.append(step(**inputs, **caches)[0].float().cpu())
        if decoded:
            state = [SequenceStep([t], s.cached + len(s.token_ids), s.blocks) for s, t in zip(state, decoded)]
    return logits


def test_the_cuda_target_builds_deepseek_and_its_kernels_give_the_reference_logits(deepseek_cuda):
    assert deepseek_cuda.info.backend == "cuda" and deepseek_cuda.graph.op_counts()["paged_mla_attention"] == 2
    fast = _logits_of_steps(deepseek_cuda, "cpu", cuda_kernels("cpu"))
    reference = _logits_of_steps(deepseek_cuda, "cpu", reference_kernels("cpu"))
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@GPU
def test_gpu_deepseek_tuned_logits_and_greedy_tokens_with_cuda_graphs(deepseek_cuda):
    assert set(deepseek_cuda.kernel_configs["paged_mla_attention"]) == {"decode", "decode_wide", "prefill"}
    fast = _logits_of_steps(deepseek_cuda, "cuda", cuda_kernels("cuda"))
    reference = _logits_of_steps(deepseek_cuda, "cpu", reference_kernels("cpu"))
    for got, want in zip(fast, reference):  # Triton's float32 dots round through TF32
        assert (got - want).norm() / want.norm() < 1e-2
    prompts = [[5, 9, 13, 200, 7, 1, 2, 3, 4, 5, 6, 7, 8], [33, 34, 35]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {graphs: [o.token_ids for o in LLM(deepseek_cuda, RuntimeConfig(
        device="cuda", num_blocks=32, block_size=4, cuda_graphs=graphs)).generate(prompts, params)]
        for graphs in ("off", "all")}
    assert tokens["all"] == tokens["off"]
