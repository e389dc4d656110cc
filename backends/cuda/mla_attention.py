"""Multi-head latent attention (DeepSeek-V2/V3) in Triton: ``paged_mla_attention`` in the
absorbed form over a paged latent cache (see ``ir/opdefs/mla.py`` for the op and
``backends/mla.py`` for the same math in torch).

The cache holds ``concat(latent, k_rope)`` per token (``rank + rope`` values: 512 + 64 in
DeepSeek-V3). Each query head absorbs the key half of ``kv_b`` (``q_nope W_k[h]``, a batched
cuBLAS GEMM), so that every head attends over the cache rows as they are stored, one key
head shared by all query heads; the values are the rows' first ``rank`` features, and the
attended latent is brought to ``v_dim`` by the value half of ``kv_b`` (a second GEMM).
Three kernels:

- **write**: the step's latents and rotated keys into the cache at ``slot_mapping`` (a
  negative slot writes nothing). It runs before the attention, which then reads every key,
  the step's own too, from the cache.
- **decode** (every sequence brings one token): a program per (block of ``block_h``
  query heads, sequence, split of the context; the head blocks of a sequence launched side
  by side, so that they share its rows in L2) walks the context's latent rows once for all
  the heads of its block, scoring ``q_latent . latent + q_rope . k_rope``; with
  DeepSeek-V3's 128 heads a row is read by ``128 / block_h`` programs (one tile of 16 heads
  x 512 features in float32 is what a program's registers hold). Long contexts of few
  sequences are split to fill the GPU and merged by log-sum-exp with the paged attention's
  merge kernel.
- **prefill** (any mix of prefills, prefill chunks over a cached prefix, and decodes):
  causal, a program takes ``block_q`` query tokens of one sequence times ``block_h`` heads
  and walks that sequence's keys up to its last query.

As in ``attention.py``, nothing is read back to the host and the integers that change from
step to step are not specialized on, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention import _LOG2E, _auto_splits, _merge_kernel, _online_softmax, _pow2, _sequence_of, multiprocessors


@dataclass(frozen=True)
class MlaDecodeConfig:
    """Launch parameters of the decode kernel: query heads per program, cached tokens per
    tile, splits of a context (0: enough to fill the GPU), warps and pipeline stages."""

    block_h: int = 16
    block_n: int = 32
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MlaPrefillConfig:
    """Launch parameters of the prefill kernel: query tokens and heads per program (their
    product is the tile's rows), cached tokens per tile, warps and pipeline stages."""

    block_q: int = 2
    block_h: int = 16
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 2


@dataclass(frozen=True)
class MlaConfig:
    """The kernels' launch parameters: decode of few sequences (contexts split to fill the
    GPU), decode of many (one split each), and prefill."""

    decode: MlaDecodeConfig = MlaDecodeConfig()
    decode_wide: MlaDecodeConfig = MlaDecodeConfig(num_splits=1)
    prefill: MlaPrefillConfig = MlaPrefillConfig()


def mla_decode_configs(wide: bool) -> list[MlaDecodeConfig]:
    """Candidate decode configurations for the tuner: for many sequences (``wide``, one
    split each) or for few (splits chosen to fill the GPU)."""
    if wide:
        return [MlaDecodeConfig(block_h, block_n, 1, warps, stages) for block_h in (16, 32, 64) for block_n in (16, 32)
                for warps in (4, 8) for stages in (1, 2)]
    return [MlaDecodeConfig(block_h, block_n, 0, warps) for block_h in (16, 32, 64) for block_n in (16, 32, 64)
            for warps in (4, 8)]


def mla_prefill_configs() -> list[MlaPrefillConfig]:
    """Candidate prefill configurations for the tuner: 16 to 64 rows of (token, head)."""
    return [MlaPrefillConfig(block_q, block_h, block_n, warps) for block_q, block_h in ((1, 16), (2, 16), (4, 16),
                                                                                      (2, 32))
            for block_n in (32, 64) for warps in (4, 8)]


@triton.jit(do_not_specialize=["tokens"])
def _write_kernel(latent, k_rope, cache, slot_mapping, tokens, stride_lt, stride_rt, stride_cb, stride_ct,
                  RANK: tl.constexpr, RANK_PAD: tl.constexpr, ROPE: tl.constexpr, ROPE_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_mapping + t, mask=t < tokens, other=-1)
    keep = slot >= 0
    slot = tl.maximum(slot, 0).to(tl.int64)
    dst = cache + ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct)[:, None]
    t = t.to(tl.int64)[:, None]
    r = tl.arange(0, RANK_PAD)[None, :]
    e = tl.arange(0, ROPE_PAD)[None, :]
    latent_mask = keep[:, None] & (r < RANK)
    rope_mask = keep[:, None] & (e < ROPE)
    tl.store(dst + r, tl.load(latent + t * stride_lt + r, mask=latent_mask), mask=latent_mask)
    tl.store(dst + RANK + e, tl.load(k_rope + t * stride_rt + e, mask=rope_mask), mask=rope_mask)


@triton.jit
def _queries(q_latent, q, tokens, heads, valid, r, e, stride_lh, stride_lt, stride_qt, stride_qh,
             NOPE: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr):
    """The absorbed queries ``[rows, rank]`` and their rotated parts ``[rows, rope]`` of the
    given (token, head) rows."""
    tokens = tokens.to(tl.int64)
    heads = heads.to(tl.int64)
    latent_at = heads * stride_lh + tokens * stride_lt
    rope_at = tokens * stride_qt + heads * stride_qh + NOPE
    q_lat = tl.load(q_latent + latent_at[:, None] + r[None, :], mask=valid[:, None] & (r < RANK)[None, :], other=0.0)
    q_pe = tl.load(q + rope_at[:, None] + e[None, :], mask=valid[:, None] & (e < ROPE)[None, :], other=0.0)
    return q_lat, q_pe


@triton.jit
def _attend_tile(cache, table_row, pos, valid, allowed, q_lat, q_pe, m, l, acc, r, e, scale_log2,
                 stride_cb, stride_ct, RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One step of the running softmax over the cached tokens at ``pos``: their latents are
    the keys' first part and the values, their rotated keys the second part."""
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct
    latents = tl.load(cache + rows[:, None] + r[None, :], mask=valid[:, None] & (r < RANK)[None, :], other=0.0)
    k_pe = tl.load(cache + RANK + rows[:, None] + e[None, :], mask=valid[:, None] & (e < ROPE)[None, :], other=0.0)
    s = tl.dot(q_pe, tl.trans(k_pe), acc=tl.dot(q_lat, tl.trans(latents))) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    return _online_softmax(s, m, l, acc, latents)


@triton.jit(do_not_specialize=["num_splits", "stride_lh", "stride_bt", "stride_ps", "stride_ph", "stride_pk"])
def _decode_kernel(q_latent, q, cache, query_start, context_lens, block_tables, part_out, part_lse, scale_log2,
                   num_splits, stride_lh, stride_lt, stride_qt, stride_qh, stride_cb, stride_ct, stride_bt,
                   stride_ps, stride_ph, stride_pk,
                   HEADS: tl.constexpr, NOPE: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                   ROPE: tl.constexpr, ROPE_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr):
    seq = tl.program_id(1)  # decode sequence s has token s
    split = tl.program_id(2)
    token = tl.load(query_start + seq)
    length = tl.load(context_lens + seq)
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < HEADS
    r = tl.arange(0, RANK_PAD)
    e = tl.arange(0, ROPE_PAD)
    q_lat, q_pe = _queries(q_latent, q, token + 0 * heads, heads, head_valid, r, e, stride_lh, stride_lt,
                           stride_qt, stride_qh, NOPE, RANK, ROPE)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RANK_PAD], tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        m, l, acc = _attend_tile(cache, table_row, pos, valid, valid[None, :], q_lat, q_pe, m, l, acc, r, e,
                                 scale_log2, stride_cb, stride_ct, RANK, ROPE, BLOCK_SIZE)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    rows = seq.to(tl.int64) * stride_ps + heads.to(tl.int64) * stride_ph + split * stride_pk
    if not DIRECT:  # one split writes the output itself; several leave partial results to merge
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse + (seq.to(tl.int64) * HEADS + heads) * num_splits + split, lse, mask=head_valid)
    tl.store(part_out + rows[:, None] + r[None, :], out.to(part_out.dtype.element_ty),
             mask=head_valid[:, None] & (r < RANK)[None, :])


@triton.jit(do_not_specialize=["num_seqs", "stride_lh", "stride_bt", "stride_oh"])
def _prefill_kernel(q_latent, q, cache, query_start, context_lens, block_tables, out, scale_log2, num_seqs,
                    stride_lh, stride_lt, stride_qt, stride_qh, stride_cb, stride_ct, stride_bt, stride_oh, stride_ot,
                    HEADS: tl.constexpr, NOPE: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                    ROPE: tl.constexpr, ROPE_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    block = tl.program_id(0)
    seq = _sequence_of(query_start, block, num_seqs, BLOCK_Q)
    first = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - first
    q_block = block - (first // BLOCK_Q + seq)
    if q_block * BLOCK_Q < q_len:
        length = tl.load(context_lens + seq)
        cached = length - q_len
        rows = tl.arange(0, BLOCK_Q * BLOCK_H)
        row_token = q_block * BLOCK_Q + rows // BLOCK_H
        row_head = tl.program_id(1) * BLOCK_H + rows % BLOCK_H
        row_valid = (row_token < q_len) & (row_head < HEADS)
        q_pos = cached + row_token
        r = tl.arange(0, RANK_PAD)
        e = tl.arange(0, ROPE_PAD)
        q_lat, q_pe = _queries(q_latent, q, first + row_token, row_head, row_valid, r, e, stride_lh, stride_lt,
                               stride_qt, stride_qh, NOPE, RANK, ROPE)
        m = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_Q * BLOCK_H, RANK_PAD], tl.float32)
        table_row = block_tables + seq.to(tl.int64) * stride_bt
        hi = tl.minimum(length, cached + q_block * BLOCK_Q + BLOCK_Q)
        for start in range(0, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi
            allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None]) & row_valid[:, None]
            m, l, acc = _attend_tile(cache, table_row, pos, valid, allowed, q_lat, q_pe, m, l, acc, r, e,
                                     scale_log2, stride_cb, stride_ct, RANK, ROPE, BLOCK_SIZE)
        result = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_rows = row_head.to(tl.int64) * stride_oh + (first + row_token).to(tl.int64) * stride_ot
        tl.store(out + o_rows[:, None] + r[None, :], result.to(out.dtype.element_ty),
                 mask=row_valid[:, None] & (r < RANK)[None, :])


def paged_mla_attention(q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, kv_b: torch.Tensor,
                        cache: torch.Tensor, slot_mapping: torch.Tensor, query_start: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float | None = None,
                        config: MlaConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``paged_mla_attention`` op: write the step's latents and rotated keys into the
    cache (in place), attend in the absorbed form; returns the output ``[num_tokens, heads,
    v_dim]`` and the cache."""
    config = config or MlaConfig()
    tokens, heads, query_dim = q.shape
    rank, rope = latent.shape[-1], k_rope.shape[-1]
    nope = query_dim - rope
    if cache.dtype != latent.dtype or cache.shape[2:] != (1, rank + rope):
        raise ValueError(f"the Triton latent attention needs a cache [num_blocks, block_size, 1, {rank + rope}] of "
                         f"{latent.dtype}, got {tuple(cache.shape)} of {cache.dtype}")
    latent, k_rope = (t if t.stride(-1) == 1 else t.contiguous() for t in (latent, k_rope))
    q = q if q.stride(-1) == 1 else q.contiguous()
    features = dict(RANK=rank, RANK_PAD=max(16, _pow2(rank)), ROPE=rope, ROPE_PAD=max(16, _pow2(rope)),
                    BLOCK_SIZE=cache.shape[1])
    write_latents(latent, k_rope, cache, slot_mapping, features)
    weights = kv_b.reshape(heads, -1, rank)  # per head: nope key rows, then v_dim value rows
    q_latent = torch.bmm(q[..., :nope].transpose(0, 1), weights[:, :nope])  # [heads, tokens, rank]
    o_latent = torch.empty_like(q_latent)
    num_seqs = context_lens.shape[0]
    if tokens and num_seqs:
        dims = dict(HEADS=heads, NOPE=nope, **features)
        args = (q_latent, q, cache, query_start, context_lens, block_tables)
        scale_log2 = (query_dim ** -0.5 if scale is None else scale) * _LOG2E
        strides = (q_latent.stride(0), q_latent.stride(1), q.stride(0), q.stride(1), cache.stride(0),
                   cache.stride(1), block_tables.stride(0))
        if tokens == num_seqs:
            _decode(args, o_latent, scale_log2, strides, dims, config, block_tables.shape[1] * cache.shape[1])
        else:
            cfg = config.prefill
            block_h = min(cfg.block_h, _pow2(heads))
            block_q = max(cfg.block_q, 16 // block_h)  # tl.dot needs 16 rows
            grid = (tokens // block_q + num_seqs, triton.cdiv(heads, block_h))  # query blocks: grid axis 0, unbounded
            _prefill_kernel[grid](*args, o_latent, scale_log2, num_seqs, *strides, o_latent.stride(0),
                                  o_latent.stride(1), BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_N=cfg.block_n,
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dims)
    out = torch.bmm(o_latent, weights[:, nope:].transpose(1, 2))  # [heads, tokens, v_dim]
    return out.transpose(0, 1), cache


def write_latents(latent: torch.Tensor, k_rope: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                  features: dict[str, int], block_t: int = 16) -> None:
    """Write ``concat(latent, k_rope)`` of each token at its slot of ``cache`` (in place;
    a negative slot writes nothing). ``features`` holds the kernels' feature sizes and the
    cache's block size."""
    tokens = latent.shape[0]
    if tokens:
        _write_kernel[(triton.cdiv(tokens, block_t),)](latent, k_rope, cache, slot_mapping, tokens, latent.stride(0),
                                                       k_rope.stride(0), cache.stride(0), cache.stride(1),
                                                       BLOCK_T=block_t, **features)


def _decode(args: tuple, o_latent: torch.Tensor, scale_log2: float, strides: tuple, dims: dict, config: MlaConfig,
            max_context: int) -> None:
    heads, num_seqs = dims["HEADS"], args[4].shape[0]
    wide = num_seqs * triton.cdiv(heads, _heads_per_program(config.decode_wide, heads)) >= \
        2 * multiprocessors(o_latent.device)
    cfg = config.decode_wide if wide else config.decode
    block_h = _heads_per_program(cfg, heads)
    head_blocks = triton.cdiv(heads, block_h)
    splits = 1 if wide else cfg.num_splits or _auto_splits(o_latent.device, num_seqs * head_blocks)
    splits = max(1, min(splits, triton.cdiv(max_context, cfg.block_n)))
    launch = dict(BLOCK_H=block_h, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dims)
    out_strides = (o_latent.stride(1), o_latent.stride(0))  # token, head
    if splits == 1:
        _decode_kernel[(head_blocks, num_seqs, 1)](*args, o_latent, o_latent, scale_log2, 1, *strides, *out_strides,
                                                   0, DIRECT=True, **launch)
        return
    part_out = torch.empty((num_seqs, heads, splits, dims["RANK_PAD"]), dtype=torch.float32, device=o_latent.device)
    part_lse = torch.empty((num_seqs, heads, splits), dtype=torch.float32, device=o_latent.device)
    part_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
    _decode_kernel[(head_blocks, num_seqs, splits)](*args, part_out, part_lse, scale_log2, splits, *strides,
                                                    *part_strides, DIRECT=False, **launch)
    block_d = min(128, dims["RANK_PAD"])  # the merge holds splits x block_d partial results
    _merge_kernel[(num_seqs, heads, triton.cdiv(dims["RANK"], block_d))](
        part_out, part_lse, o_latent, args[3], splits, heads, *part_strides, *out_strides, D=dims["RANK"],
        BLOCK_D=block_d, SPLITS_PAD=_pow2(splits))


def _heads_per_program(cfg: MlaDecodeConfig, heads: int) -> int:
    """Query heads per decode program: the configuration's, at least 16 (``tl.dot``'s
    fewest rows) and no more than the heads rounded up to a power of two need."""
    return max(16, min(cfg.block_h, _pow2(heads)))
