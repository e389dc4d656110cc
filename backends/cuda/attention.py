"""Paged attention in Triton: a flattened mixed batch over a paged KV cache.

Two kernels serve ``paged_attention`` (see ``ir/opdefs/paged.py`` for the op):

- **decode** (every sequence brings one token): split-KV "flash-decoding". Stage 1 runs a
  program per (sequence, KV head, split of the context); each program serves all the
  query heads that share its KV head, so every key and value is read once. Stage 2 merges
  the splits by their log-sum-exp.
- **prefill** (any mix of prefills, prefill chunks and decodes): FlashAttention-2 style,
  variable length and causal. A program takes a block of one sequence's query tokens,
  times all query heads of one KV head, and walks that sequence's keys.

A sliding window or chunked local attention (Llama 4's ``chunk_size``: a query at ``p``
sees the keys at ``k <= p`` with ``k // chunk_size == p // chunk_size``) is a constexpr
flag and a runtime size, so that layers without them pay nothing; with them, each program
starts at the tile of the first key its queries may see (the splits of a decode share the
visible keys), so a long context's keys before the window or chunk are never read.
ALiBi (BLOOM, MPT: ``alibi_bias_max``) is a constexpr flag in the same way: each program
computes its query heads' slopes as ``alibi_slopes`` in ``ir/opdefs/nn.py`` does (nothing is
copied to the GPU per step) and adds ``slope * (key - query)`` to the scores after the
scaling and softcap, before the mask.

Both read the keys of earlier steps from the paged cache (block tables are read inside
the kernel) and the step's own keys and values straight from ``k`` and ``v``; each
program also writes its own tokens' keys and values into the cache at ``slot_mapping``
(a negative slot writes nothing). No program reads a cache slot that this launch writes,
so the write is fused into the attention kernel without a race.

Everything the launch needs is a tensor shape or an engine limit: nothing is read back
from the GPU, so a step can be captured in a CUDA graph. Integer arguments that change
from step to step (sequence counts, splits, block-table widths) are not specialized on, so
Triton compiles each kernel once per model, not again whenever one of them first becomes
1 or a multiple of 16. An E4M3 cache (``kv_cache_dtype="fp8"``) stores keys and values
saturated to E4M3 with a scale of 1 and is read back into the queries' dtype, as the op's
reference does; a decode step then reads half the cache bytes. A step whose token count equals
its sequence count is all decodes (the scheduler never schedules an empty sequence; a
padded sequence of a captured graph has one token and a negative slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp8 import E4M3_MAX

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel: keys per tile, splits of a context,
    warps and pipeline stages. ``num_splits`` 0 chooses enough splits to fill the GPU."""

    block_n: int = 64
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel: query tokens and keys per tile."""

    block_q: int = 32
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class AttentionConfig:
    """The kernels' launch parameters, as the build-time tuner stores them: decode of few
    sequences (whose contexts are split to fill the GPU), decode of many (one program per
    sequence and KV head fills it), and prefill."""

    decode: DecodeConfig = DecodeConfig()
    decode_wide: DecodeConfig = DecodeConfig(block_n=32, num_splits=1)
    prefill: PrefillConfig = PrefillConfig()


def decode_configs(wide: bool) -> list[DecodeConfig]:
    """Candidate decode configurations for the tuner: for many sequences (``wide``, one
    split each) or for few (splits chosen to fill the GPU)."""
    if wide:
        return [DecodeConfig(block_n, 1, warps, stages) for block_n in (16, 32, 64) for warps in (2, 4)
                for stages in (2, 3)]
    return [DecodeConfig(block_n, 0, warps) for block_n in (32, 64, 128) for warps in (4, 8)]


def prefill_configs(group: int) -> list[PrefillConfig]:
    """Candidate prefill configurations for the tuner, for ``group`` query heads per KV head."""
    rows = (64, 128) if group <= 8 else (group, 2 * group)
    return [PrefillConfig(max(1, m // _pow2(group)), block_n, warps) for m in rows for block_n in (32, 64)
            for warps in (4, 8)]


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def _kv_rows(table_row, pos, valid, cached, new_start, head, stride_cb, stride_ct, stride_ch, stride_nt, stride_nh,
             BLOCK_SIZE: tl.constexpr):
    """Where one sequence's keys and values at positions ``pos`` are: row offsets into the
    paged cache (below ``cached``) and into the step's new rows (``new_start`` onwards),
    each with its mask. Keys and values share them."""
    in_cache = valid & (pos < cached)
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=in_cache, other=0).to(tl.int64)
    cache_rows = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head * stride_ch
    is_new = valid & (pos >= cached)
    new_rows = (new_start + pos - cached).to(tl.int64) * stride_nt + head * stride_nh
    return cache_rows, in_cache, new_rows, is_new


@triton.jit
def _as_cached(x, FP8_CACHE: tl.constexpr):
    """Keys or values as the cache holds them: as they are, or saturated to E4M3 (scale 1)."""
    if FP8_CACHE:
        cached = tl.clamp(x.to(tl.float32), -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
    else:
        cached = x
    return cached


@triton.jit
def _gather(cache, new, cache_rows, in_cache, new_rows, is_new, d, d_mask, FP8_CACHE: tl.constexpr):
    """A [len(rows), D] tile of keys or values at the rows ``_kv_rows`` found, in the new
    keys' dtype; with an E4M3 cache the step's own keys are rounded as the cache stores
    them, so every position attends to what a later step will read."""
    old = tl.load(cache + cache_rows[:, None] + d[None, :], mask=in_cache[:, None] & d_mask[None, :], other=0.0)
    fresh = tl.load(new + new_rows[:, None] + d[None, :], mask=is_new[:, None] & d_mask[None, :], other=0.0)
    if FP8_CACHE:
        tile = (old.to(tl.float32) + _as_cached(fresh, FP8_CACHE).to(tl.float32)).to(fresh.dtype)
    else:
        tile = old + fresh
    return tile


@triton.jit
def _store_kv(k, v, k_cache, v_cache, slot_mapping, tokens, valid, head, d, d_mask,
              stride_nt, stride_nh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr,
              FP8_CACHE: tl.constexpr):
    """Write the new keys and values of ``tokens`` (one KV head) at their slots."""
    slot = tl.load(slot_mapping + tokens, mask=valid, other=-1)
    keep = (valid & (slot >= 0))[:, None] & d_mask[None, :]
    slot = tl.maximum(slot, 0).to(tl.int64)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head * stride_ch
    src = tokens.to(tl.int64) * stride_nt + head * stride_nh
    tl.store(k_cache + dst[:, None] + d[None, :], _as_cached(tl.load(k + src[:, None] + d[None, :], mask=keep),
                                                             FP8_CACHE), mask=keep)
    tl.store(v_cache + dst[:, None] + d[None, :], _as_cached(tl.load(v + src[:, None] + d[None, :], mask=keep),
                                                             FP8_CACHE), mask=keep)


@triton.jit
def _scores(q, keys, scale_log2, softcap, SOFTCAP: tl.constexpr):
    """Scores in base 2 (``exp2`` of them is proportional to the softmax weights)."""
    s = tl.dot(q, tl.trans(keys))
    if SOFTCAP:
        x = s * (scale_log2 / 1.4426950408889634) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634  # softcap * tanh(x)
    else:
        s = s * scale_log2
    return s


@triton.jit
def _alibi_slopes_log2(heads, alibi_step, alibi_pow2):
    """ALiBi's slopes of query ``heads`` in base 2, as ``alibi_slopes`` computes them: for
    ``p = alibi_pow2`` (the largest power of two not above the head count) and ``alibi_step``
    (the maximum bias over ``p``), head ``h < p`` has ``2 ** (-alibi_step (h + 1))``, and head
    ``h >= p`` the odd slopes of ``2 p`` heads, ``2 ** (-alibi_step (h - p + 1/2))``."""
    exponent = tl.where(heads < alibi_pow2, heads + 1.0, heads - alibi_pow2 + 0.5)
    return tl.exp2(-alibi_step * exponent) * 1.4426950408889634


@triton.jit
def _online_softmax(s, m, l, acc, values):
    """One step of the running softmax over a tile of scores ``s`` (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m - m_use)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
    return m_new, l, acc


@triton.jit
def _first_key(query_pos, window, chunk_size, WINDOW: tl.constexpr, CHUNK: tl.constexpr):
    """The first key position that a query at ``query_pos`` may see (0, or the start of its
    sliding window, or of its chunk of ``chunk_size`` positions, whichever is last); it may
    see every key from there up to itself."""
    first = query_pos * 0  # a tensor like query_pos in every case
    if WINDOW:
        first = tl.maximum(query_pos - window + 1, first)
    if CHUNK:
        first = tl.maximum(query_pos // chunk_size * chunk_size, first)
    return first


@triton.jit(do_not_specialize=["window", "chunk_size", "alibi_pow2", "num_splits", "stride_bt", "stride_ps",
                               "stride_ph", "stride_pk"])
def _decode_kernel(q, k, v, k_cache, v_cache, slot_mapping, query_start, context_lens, block_tables,
                   part_out, part_lse, scale_log2, softcap, window, chunk_size, alibi_step, alibi_pow2, num_splits,
                   stride_qt, stride_qh, stride_nt, stride_nh, stride_cb, stride_ct, stride_ch, stride_bt,
                   stride_ps, stride_ph, stride_pk,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                   CHUNK: tl.constexpr, ALIBI: tl.constexpr, DIRECT: tl.constexpr, FP8_CACHE: tl.constexpr):
    seq = tl.program_id(0)  # decode sequence s has token s
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start + seq)
    length = tl.load(context_lens + seq)
    cached = length - 1
    # The splits share the keys the query may see, from the tile of the first one on: none
    # reads a key before its window or its chunk.
    seen_from = _first_key(cached, window, chunk_size, WINDOW, CHUNK)
    start = seen_from // BLOCK_N * BLOCK_N
    span = tl.cdiv(tl.cdiv(length - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * span
    hi = tl.minimum(lo + span, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    heads = kv_head * G + g
    q_rows = token.to(tl.int64) * stride_qt + heads * stride_qh
    qv = tl.load(q + q_rows[:, None] + d[None, :], mask=(g < G)[:, None] & d_mask[None, :], other=0.0)
    if ALIBI:
        slopes = _alibi_slopes_log2(heads, alibi_step, alibi_pow2)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        kv_at = _kv_rows(table_row, pos, valid, cached, token, kv_head, stride_cb, stride_ct, stride_ch, stride_nt,
                        stride_nh, BLOCK_SIZE)
        keys = _gather(k_cache, k, *kv_at, d, d_mask, FP8_CACHE)
        values = _gather(v_cache, v, *kv_at, d, d_mask, FP8_CACHE)
        s = _scores(qv, keys, scale_log2, softcap, SOFTCAP)
        if ALIBI:
            s += slopes[:, None] * (pos - cached).to(tl.float32)[None, :]
        allowed = valid
        if WINDOW or CHUNK:
            allowed = allowed & (pos >= seen_from)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m, l, acc = _online_softmax(s, m, l, acc, values)
    if (lo <= cached) & (cached < hi):
        one = tl.arange(0, 1)
        _store_kv(k, v, k_cache, v_cache, slot_mapping, token + one, one == 0, kv_head, d, d_mask,
                  stride_nt, stride_nh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, FP8_CACHE)
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    rows = seq.to(tl.int64) * stride_ps + heads * stride_ph + split * stride_pk
    if not DIRECT:  # one split writes the output itself; several leave partial results to merge
        lse_at = (seq.to(tl.int64) * tl.num_programs(1) * G + heads) * num_splits + split
        tl.store(part_lse + lse_at, lse, mask=g < G)
    tl.store(part_out + rows[:, None] + d[None, :], out.to(part_out.dtype.element_ty),
             mask=(g < G)[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits", "num_heads", "stride_ps", "stride_ph", "stride_pk"])
def _merge_kernel(part_out, part_lse, out, query_start, num_splits, num_heads,
                  stride_ps, stride_ph, stride_pk, stride_ot, stride_oh,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start + seq)
    splits = tl.arange(0, SPLITS_PAD)
    in_range = splits < num_splits
    lse = tl.load(part_lse + (seq.to(tl.int64) * num_heads + head) * num_splits + splits, mask=in_range,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    weight = weight / tl.maximum(tl.sum(weight, 0), 1e-30)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # one program per BLOCK_D features
    rows = seq.to(tl.int64) * stride_ps + head * stride_ph + splits * stride_pk
    parts = tl.load(part_out + rows[:, None] + d[None, :], mask=in_range[:, None] & (d < D)[None, :], other=0.0)
    result = tl.sum(parts * weight[:, None], 0)
    tl.store(out + token.to(tl.int64) * stride_ot + head * stride_oh + d, result.to(out.dtype.element_ty),
             mask=d < D)


@triton.jit
def _sequence_of(query_start, block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include ``block``: sequence s owns the blocks from
    ``query_start[s] // BLOCK_Q + s`` (an upper bound of the blocks before it) on."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start + mid) // BLOCK_Q + mid <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["window", "chunk_size", "alibi_pow2", "num_seqs", "stride_bt"])
def _prefill_kernel(q, k, v, k_cache, v_cache, slot_mapping, query_start, context_lens, block_tables, out,
                    scale_log2, softcap, window, chunk_size, alibi_step, alibi_pow2, num_seqs,
                    stride_qt, stride_qh, stride_nt, stride_nh, stride_cb, stride_ct, stride_ch, stride_bt,
                    stride_ot, stride_oh,
                    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALIBI: tl.constexpr,
                    FP8_CACHE: tl.constexpr):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _sequence_of(query_start, block, num_seqs, BLOCK_Q)
    first = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - first
    q_block = block - (first // BLOCK_Q + seq)
    if q_block * BLOCK_Q < q_len:
        length = tl.load(context_lens + seq)
        cached = length - q_len
        d = tl.arange(0, D_PAD)
        d_mask = d < D
        local = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        _store_kv(k, v, k_cache, v_cache, slot_mapping, first + local, local < q_len, kv_head, d, d_mask,
                  stride_nt, stride_nh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, FP8_CACHE)
        rows = tl.arange(0, BLOCK_Q * G_PAD)
        row_token = q_block * BLOCK_Q + rows // G_PAD
        row_head = kv_head * G + rows % G_PAD
        row_valid = (row_token < q_len) & (rows % G_PAD < G)
        q_pos = cached + row_token
        q_rows = (first + row_token).to(tl.int64) * stride_qt + row_head * stride_qh
        qv = tl.load(q + q_rows[:, None] + d[None, :], mask=row_valid[:, None] & d_mask[None, :], other=0.0)
        hi = tl.minimum(length, cached + q_block * BLOCK_Q + BLOCK_Q)
        # from the tile of the first key that the block's first query sees: later queries see no earlier key
        lo = _first_key(cached + q_block * BLOCK_Q, window, chunk_size, WINDOW, CHUNK) // BLOCK_N * BLOCK_N
        seen_from = _first_key(q_pos, window, chunk_size, WINDOW, CHUNK)
        if ALIBI:
            slopes = _alibi_slopes_log2(row_head, alibi_step, alibi_pow2)
        m = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)
        table_row = block_tables + seq.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi
            kv_at = _kv_rows(table_row, pos, valid, cached, first, kv_head, stride_cb, stride_ct, stride_ch,
                            stride_nt, stride_nh, BLOCK_SIZE)
            keys = _gather(k_cache, k, *kv_at, d, d_mask, FP8_CACHE)
            values = _gather(v_cache, v, *kv_at, d, d_mask, FP8_CACHE)
            s = _scores(qv, keys, scale_log2, softcap, SOFTCAP)
            if ALIBI:
                s += slopes[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
            allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None]) & row_valid[:, None]
            if WINDOW or CHUNK:
                allowed = allowed & (pos[None, :] >= seen_from[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m, l, acc = _online_softmax(s, m, l, acc, values)
        result = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_rows = (first + row_token).to(tl.int64) * stride_ot + row_head * stride_oh
        tl.store(out + o_rows[:, None] + d[None, :], result.to(out.dtype.element_ty),
                 mask=row_valid[:, None] & d_mask[None, :])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, query_start: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    alibi_bias_max: float | None = None, chunk_size: int | None = None,
                    config: AttentionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``paged_attention`` op: write the step's keys and values into the caches (in
    place) and attend; returns the output [num_tokens, heads, head_dim] and the caches.
    With ``chunk_size`` (Llama 4's chunked local attention) a query at position ``p`` sees
    the keys at ``k <= p`` with ``k // chunk_size == p // chunk_size``, and no program reads
    a tile of keys before its queries' chunk. With ``alibi_bias_max`` head ``h`` adds
    ``alibi_slopes(heads, alibi_bias_max)[h] * (key - query)`` to its scores (BLOOM, MPT)."""
    if alibi_bias_max is not None and alibi_bias_max <= 0:
        raise ValueError(f"alibi_bias_max must be positive, got {alibi_bias_max}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    config = config or AttentionConfig()
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if v.shape[2] != head_dim:
        raise ValueError(f"the Triton paged attention needs one head size for q, k and v; got {head_dim} and "
                         f"{v.shape[2]}")
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if tokens == 0 or num_seqs == 0:
        return out, k_cache, v_cache
    group = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    common = dict(G=group, G_PAD=max(_pow2(group), 1), D=head_dim, D_PAD=_pow2(head_dim),
                  BLOCK_SIZE=k_cache.shape[1], SOFTCAP=softcap is not None, WINDOW=sliding_window is not None,
                  CHUNK=chunk_size is not None, ALIBI=alibi_bias_max is not None,
                  FP8_CACHE=k_cache.dtype == torch.float8_e4m3fn)
    args = (q, k, v, k_cache, v_cache, slot_mapping, query_start, context_lens, block_tables)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), block_tables.stride(0))
    alibi_pow2 = 1 << (heads.bit_length() - 1)  # the largest power of two not above the head count
    extras = (scale * _LOG2E, softcap or 1.0, sliding_window or 0, chunk_size or 1,
              (alibi_bias_max or 1.0) / alibi_pow2, alibi_pow2)
    if tokens == num_seqs:
        max_context = block_tables.shape[1] * k_cache.shape[1]
        visible = min([max_context] + [n for n in (sliding_window, chunk_size) if n is not None])
        _decode(args, out, strides, extras, common, config, heads, kv_heads, num_seqs, max_context, visible)
    else:
        cfg = config.prefill
        block_q = max(cfg.block_q, 16 // common["G_PAD"], 1)
        grid = (tokens // block_q + num_seqs, kv_heads)
        _prefill_kernel[grid](*args, out, *extras, num_seqs, *strides, out.stride(0), out.stride(1),
                              BLOCK_Q=block_q, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages, **common)
    return out, k_cache, v_cache


def _decode(args, out, strides, extras, common, config: AttentionConfig, heads: int, kv_heads: int,
            num_seqs: int, max_context: int, visible: int) -> None:
    """Launch the decode kernel (and the merge of its splits): ``visible`` is the most keys a
    query may see (its window or chunk), which with the alignment of the first one to a tile
    bounds the tiles a split can have."""
    wide = num_seqs * kv_heads >= 2 * multiprocessors(out.device)
    cfg = config.decode_wide if wide else config.decode
    splits = 1 if wide else cfg.num_splits or _auto_splits(out.device, num_seqs * kv_heads)
    splits = max(1, min(splits, triton.cdiv(min(max_context, visible + cfg.block_n - 1), cfg.block_n)))
    head_dim = out.shape[2]
    common = {**common, "G_PAD": max(16, common["G_PAD"])}  # tl.dot needs 16 rows
    if splits == 1:
        _decode_kernel[(num_seqs, kv_heads, 1)](*args, out, out, *extras, 1, *strides, out.stride(0),
                                                out.stride(1), 0, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages, DIRECT=True, **common)
        return
    part_out = torch.empty((num_seqs, heads, splits, common["D_PAD"]), dtype=torch.float32, device=out.device)
    part_lse = torch.empty((num_seqs, heads, splits), dtype=torch.float32, device=out.device)
    part_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
    _decode_kernel[(num_seqs, kv_heads, splits)](*args, part_out, part_lse, *extras, splits, *strides,
                                                 *part_strides, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                                                 num_stages=cfg.num_stages, DIRECT=False, **common)
    _merge_kernel[(num_seqs, heads)](part_out, part_lse, out, args[6], splits, heads, *part_strides,
                                     out.stride(0), out.stride(1), D=head_dim, BLOCK_D=common["D_PAD"],
                                     SPLITS_PAD=_pow2(splits))


def _auto_splits(device: torch.device, programs: int) -> int:
    """Splits per context that give about two programs per multiprocessor."""
    return max(1, triton.cdiv(2 * multiprocessors(device), programs))


_SM_COUNT: dict[str, int] = {}


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 for the CPU, where the interpreter runs)."""
    if device.type != "cuda":
        return 4
    key = str(device)
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[key]
