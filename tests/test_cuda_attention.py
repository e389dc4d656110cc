"""The Triton paged attention against the registry's reference op: decode (split-KV),
prefill, chunked prefill with a cached prefix and mixed steps, GQA, sliding window,
softcap, chunked local attention (Llama 4), ALiBi (BLOOM, MPT), blocks out of order, padded
sequences; the cache writes fused into the kernel."""

import pytest
import torch

from kiln.ir import REGISTRY

attention = pytest.importorskip("kiln.backends.cuda.attention")

GPU = pytest.mark.gpu


def make_step(query_lens, cached_lens, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """A random step: caches holding each sequence's cached prefix in shuffled blocks (the
    rest NaN, which no kernel may read), and the step's q, k, v and metadata."""
    g = torch.Generator().manual_seed(seed)
    lengths = [c + n for c, n in zip(cached_lens, query_lens)]
    per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_seq) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, at = [], [], 0
    for count, cached, length in zip(per_seq, cached_lens, lengths):
        blocks = order[at:at + count]
        at += count
        tables.append(blocks + [0] * (max(per_seq) - count))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, length)]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for table, cached in zip(tables, cached_lens):
        for p in range(cached):
            b, o = table[p // block_size], p % block_size
            k_cache[b, o] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[b, o] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    args = (q, k, v, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64), starts,
            torch.tensor(lengths, dtype=torch.int32), torch.tensor(tables, dtype=torch.int32))
    return tuple(a.to(device) for a in args)


def check(query_lens, cached_lens, heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
          device="cpu", scale=None, sliding_window=None, softcap=None, chunk_size=None, alibi_bias_max=None,
          config=None, tolerance=2e-3):
    args = make_step(query_lens, cached_lens, heads, kv_heads, head_dim, block_size, dtype, device)
    attrs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size,
                 alibi_bias_max=alibi_bias_max)
    want, want_k, want_v = REGISTRY["paged_attention"].reference(*(a.cpu().float() for a in args[:5]),
                                                                 *(a.cpu() for a in args[5:]), **attrs)
    k_cache, v_cache = args[3], args[4]
    out, k_out, v_out = attention.paged_attention(*args, **attrs, config=config)
    assert k_out is k_cache and v_out is v_cache  # in place
    written = ~torch.isnan(want_k)
    assert torch.equal(k_cache.cpu().float()[written], want_k[written])
    assert torch.equal(v_cache.cpu().float()[written], want_v[written])
    error = (out.cpu().float() - want).norm() / want.norm()
    assert error < tolerance, error


CPU_CASES = {
    "decode": ([1, 1, 1], [5, 40, 17]),
    "decode of many sequences": ([1] * 5, [5, 40, 17, 1, 70]),
    "prefill": ([7, 20], [0, 0]),
    "chunked prefill over a cached prefix": ([9, 3], [33, 16]),
    "mixed": ([1, 12, 1, 5], [30, 0, 64, 11]),
}


@pytest.mark.parametrize("case", CPU_CASES)
def test_matches_the_reference(case):
    check(*CPU_CASES[case])


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_sliding_window_and_softcap(case):
    check(*CPU_CASES[case], sliding_window=8, softcap=5.0, scale=0.3)


@pytest.mark.parametrize("chunk_size", [5, 16, 24])
@pytest.mark.parametrize("case", CPU_CASES)
def test_chunked_local_attention(case, chunk_size):
    """Chunks that cut through the cache's blocks and the kernels' tiles (5, 24) or align
    with the blocks (16); contexts shorter than a chunk and spanning several; decode,
    prefill, prefill over a cached prefix and mixed steps."""
    check(*CPU_CASES[case], chunk_size=chunk_size)


def test_chunked_local_attention_with_splits_window_and_small_tiles():
    small = attention.AttentionConfig(decode=attention.DecodeConfig(block_n=16, num_splits=3),
                                      prefill=attention.PrefillConfig(block_q=4, block_n=16))
    check([1, 1, 1], [70, 3, 40], chunk_size=20, config=small)  # the splits share the chunk's keys
    check([1, 9, 1, 5], [30, 40, 64, 11], chunk_size=12, sliding_window=7, softcap=5.0, config=small)


@pytest.mark.parametrize("query_lens, cached_lens", [([1, 1], [70, 37]), ([9, 1, 20], [33, 50, 0])])
def test_chunked_attention_reads_no_key_before_its_chunk(query_lens, cached_lens):
    """The cached keys and values before each sequence's first chunk are made NaN after the
    reference ran: a kernel that read one (even masked) would give NaN."""
    config = attention.AttentionConfig(decode=attention.DecodeConfig(block_n=16, num_splits=2),
                                       prefill=attention.PrefillConfig(block_q=4, block_n=16))
    args = make_step(query_lens, cached_lens, 4, 2, 32, 16, torch.float32, "cpu")
    want = REGISTRY["paged_attention"].reference(*args, scale=None, sliding_window=None, softcap=None,
                                                 chunk_size=16)[0]
    tables = args[8]
    for table, cached in zip(tables.tolist(), cached_lens):
        for block in table[:cached // 16]:  # blocks wholly before the chunk of the sequence's first query
            args[3][block] = float("nan")
            args[4][block] = float("nan")
    out = attention.paged_attention(*args, chunk_size=16, config=config)[0]
    assert (out - want).norm() / want.norm() < 2e-3


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (12, 4)])
@pytest.mark.parametrize("case", CPU_CASES)
def test_alibi(case, heads, kv_heads):
    """ALiBi's slopes for 4 heads (a power of two), 6 and 12 (not: the interleaved extra
    slopes), in groups of 1, 3 and 3 query heads per KV head (BLOOM and MPT have 1)."""
    check(*CPU_CASES[case], heads=heads, kv_heads=kv_heads, alibi_bias_max=8.0)


def test_alibi_with_splits_small_tiles_window_and_softcap():
    small = attention.AttentionConfig(decode=attention.DecodeConfig(block_n=16, num_splits=3),
                                      prefill=attention.PrefillConfig(block_q=4, block_n=16))
    check([1, 1, 1], [70, 3, 40], heads=6, kv_heads=6, alibi_bias_max=8.0, config=small)  # the splits' biases
    check([1, 9, 1, 5], [30, 40, 64, 11], heads=6, kv_heads=3, alibi_bias_max=4.0, sliding_window=7, softcap=5.0,
          scale=0.3, config=small)
    check([1, 1], [9, 20], heads=6, kv_heads=2, head_dim=24, dtype=torch.float16, block_size=8, alibi_bias_max=8.0)
    with pytest.raises(ValueError, match="alibi_bias_max must be positive"):
        attention.paged_attention(*make_step([1], [3], 4, 4, 32, 16, torch.float32, "cpu"), alibi_bias_max=0.0)


def test_decode_splits_long_contexts():
    small = attention.AttentionConfig(decode=attention.DecodeConfig(block_n=16, num_splits=3))
    check([1, 1], [70, 3], config=small)


def test_float16_and_odd_head_sizes():
    check([1, 1], [9, 20], heads=6, kv_heads=2, head_dim=24, dtype=torch.float16, block_size=8)
    check([6, 2], [3, 0], heads=3, kv_heads=3, head_dim=24, dtype=torch.float16, block_size=8)


def test_a_negative_slot_writes_nothing():
    args = list(make_step([1, 1], [4, 6], 4, 2, 32, 16, torch.float32, "cpu"))
    args[5] = torch.tensor([-1, args[5][1]])
    before = args[3].clone()
    attention.paged_attention(*args)
    changed = ~((args[3] == before) | (args[3].isnan() & before.isnan()))
    assert changed.sum() == 2 * 32  # one token of two KV heads: the second sequence's


@GPU
@pytest.mark.parametrize("case", ["decode", "prefill", "chunked", "mixed"])
def test_real_shapes_in_bfloat16(case):
    shapes = {"decode": ([1] * 64, [int(x) for x in torch.randint(1, 3000, (64,))]),
              "prefill": ([2048], [0]), "chunked": ([512, 300], [1024, 77]),
              "mixed": ([1] * 30 + [700, 1], [int(x) for x in torch.randint(1, 900, (30,))] + [0, 4000])}[case]
    check(*shapes, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda", tolerance=2e-2)


@GPU
@pytest.mark.parametrize("case", ["decode", "chunked", "mixed"])
def test_llama4_chunked_attention_in_bfloat16(case):
    """Llama 4 Scout's attention (40 query heads, 8 KV heads of 128; chunks of 8192 positions)
    at contexts on both sides of a chunk boundary."""
    shapes = {"decode": ([1] * 16, [int(x) for x in torch.randint(8000, 20000, (16,))]),
              "chunked": ([512, 300], [8000, 16300]),
              "mixed": ([1] * 30 + [700, 1], [int(x) for x in torch.randint(1, 9000, (30,))] + [7900, 12000])}[case]
    check(*shapes, heads=40, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda", chunk_size=8192,
          tolerance=2e-2)


@GPU
@pytest.mark.parametrize("case", ["decode", "prefill", "chunked", "mixed"])
def test_bloom_alibi_in_bfloat16(case):
    """ALiBi at BLOOM-7B1's attention (32 heads of 128, no grouping) and, in the mixed step,
    BLOOM-176B's (112 heads: not a power of two)."""
    shapes = {"decode": ([1] * 64, [int(x) for x in torch.randint(1, 3000, (64,))]),
              "prefill": ([2048], [0]), "chunked": ([512, 300], [1024, 77]),
              "mixed": ([1] * 30 + [700, 1], [int(x) for x in torch.randint(1, 900, (30,))] + [0, 4000])}[case]
    check(*shapes, heads=32, kv_heads=32, head_dim=128, dtype=torch.bfloat16, device="cuda", alibi_bias_max=8.0,
          tolerance=2e-2)
    if case == "mixed":
        check(*shapes, heads=112, kv_heads=112, head_dim=128, dtype=torch.bfloat16, device="cuda",
              alibi_bias_max=8.0, tolerance=2e-2)


@GPU
def test_smollm_shapes_window_softcap_in_bfloat16():
    check([1] * 8, [100, 3, 250, 1, 64, 999, 31, 500], heads=9, kv_heads=3, head_dim=64, dtype=torch.bfloat16,
          device="cuda", tolerance=2e-2)
    check([1, 300, 1], [2000, 50, 17], heads=16, kv_heads=8, head_dim=256, dtype=torch.bfloat16, device="cuda",
          sliding_window=256, softcap=50.0, tolerance=2e-2)


@GPU
@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_fp8_caches_in_bfloat16(case):
    """E4M3 caches (``kv_cache_dtype="fp8"``): the kernels write the step's keys and values
    saturated to E4M3 exactly as the reference does, and attend to what the cache holds."""
    shapes = {"decode": ([1] * 64, [int(x) for x in torch.randint(1, 3000, (64,))]),
              "mixed": ([1] * 30 + [700, 1], [int(x) for x in torch.randint(1, 900, (30,))] + [0, 4000])}[case]
    args = make_step(*shapes, heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
                     device="cuda")
    args = (*args[:3], *(c.to(torch.float8_e4m3fn) for c in args[3:5]), *args[5:])
    want, want_k, want_v = REGISTRY["paged_attention"].reference(*(a.float() for a in args[:3]), *args[3:],
                                                                 scale=None, sliding_window=None, softcap=None)
    out, k_cache, v_cache = attention.paged_attention(*args)
    written = ~torch.isnan(want_k.float())
    assert torch.equal(k_cache.float()[written], want_k.float()[written])
    assert torch.equal(v_cache.float()[written], want_v.float()[written])
    assert (out.float() - want).norm() / want.norm() < 2e-2
