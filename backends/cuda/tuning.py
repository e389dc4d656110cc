"""Build-time tuning: launch parameters measured on the target GPU and stored in the
engine, so that ``kiln.load`` never tunes.

The paged-attention kernels (and the latent attention's, for multi-head latent attention)
are tuned, the ones whose best parameters depend on the GPU and the model's head layout:
decode of one sequence with a long context, decode of a full batch, prefill of one long
prompt, each candidate timed with ``triton.testing.do_bench`` (which clears the L2 cache
before each run). So is ``linear`` at one row (batch-1 decode): for each weight shape, the
Triton GEMV's candidates against cuBLAS; the GEMV is kept only where it wins. The
quantized linears' GEMVs are tuned per weight shape the same way, over random operands of
the layer's own layout. The norm, activation and rotary kernels choose their parameters
per shape at run time.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ...ir import Graph, Node, TensorType, dtypes
from ...passes.profiles import EngineLimits
from . import quantized
from .attention import AttentionConfig, decode_configs, multiprocessors, paged_attention, prefill_configs
from .configs import shape_key
from .gemv import gemv, gemv_configs
from .mla_attention import MlaConfig, mla_decode_configs, mla_prefill_configs, paged_mla_attention
from .quantized_gemv import gemv_candidates
from .scaled_linear import scaled_linear
from .targets import device_name, matches

_BLOCK_SIZE = 16


def tune_engine_kernels(graph: Graph, target: str, limits: EngineLimits) -> tuple[str | None, dict[str, dict]]:
    """(the GPU tuned on, op -> tuned configuration fields) for an engine built for
    ``target``. Without a ``target`` GPU here nothing is tuned: the engine keeps the
    kernels' defaults, and a warning says so."""
    name = device_name()
    if name is None or not matches(target, name):
        warnings.warn(f"no {target} GPU here ({name or 'torch sees no CUDA device'}): the engine is built with the "
                      "kernels' default launch parameters, not tuned ones; it runs on any GPU of its target. "
                      "Build it on that GPU to tune them.", stacklevel=3)
        return None, {}
    configs: dict[str, dict] = {"linear": _gemv_choices(graph), **_quantized_gemv_choices(graph)}
    for node in graph.nodes:
        if node.op in _ATTENTION_TUNERS and node.op not in configs:
            configs[node.op] = dataclasses.asdict(_ATTENTION_TUNERS[node.op](node, limits))
    return name, configs


def _attention_config(node: Node, limits: EngineLimits) -> AttentionConfig:
    """The fastest paged-attention configurations for ``node``'s head layout."""
    q, k = node.inputs[0].type, node.inputs[1].type
    heads, kv_heads, head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[2])
    attrs = {key: node.attrs.get(key) for key in ("scale", "sliding_window", "softcap", "alibi_bias_max")}
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=q.dtype.torch_dtype)

    def run_with(cached: list[int], query_lens: list[int]):
        args = random_step(cached, query_lens, **shape)
        return lambda config: paged_attention(*args, **attrs, config=config)

    candidates = (decode_configs(wide=False), decode_configs(wide=True), prefill_configs(heads // kv_heads))
    return _fastest_attention(AttentionConfig, candidates, run_with, limits, kv_heads)


def _mla_config(node: Node, limits: EngineLimits) -> MlaConfig:
    """The fastest latent-attention configurations for ``node``'s heads and latent width."""
    q, latent, k_rope = (v.type for v in node.inputs[:3])
    heads, query_dim, rank, rope = int(q.shape[1]), int(q.shape[2]), int(latent.shape[2]), int(k_rope.shape[2])
    dtype, scale, kv_b_rows = q.dtype.torch_dtype, node.attrs.get("scale"), int(node.inputs[3].type.shape[0])

    def run_with(cached: list[int], query_lens: list[int]):
        args = random_mla_step(cached, query_lens, heads, query_dim, rank, rope, kv_b_rows, dtype)
        return lambda config: paged_mla_attention(*args, scale=scale, config=config)

    wide = mla_decode_configs(wide=True)
    candidates = (mla_decode_configs(wide=False), wide, mla_prefill_configs())
    return _fastest_attention(MlaConfig, candidates, run_with, limits, -(-heads // max(c.block_h for c in wide)))


def _fastest_attention(config_type: type, candidates: tuple[list, list, list], run_with, limits: EngineLimits,
                       programs_per_seq: int):
    """The fastest of each kind of candidate (decode of few sequences, decode of many,
    prefill) of an attention configuration ``config_type`` (fields ``decode``,
    ``decode_wide``, ``prefill``), each timed on the step it serves: decode of one long
    context, decode of enough sequences of ``programs_per_seq`` programs each to fill the
    GPU twice over, prefill of one long prompt. ``run_with(cached, query_lens)`` makes
    the random step and returns the function that runs it with a configuration."""
    context = min(limits.max_seq_len, 4096)
    prompt = min(limits.max_num_tokens, limits.max_seq_len, 2048)
    seqs = max(limits.max_batch_size, -(-2 * multiprocessors(torch.device("cuda")) // programs_per_seq))
    few, wide, prefill = candidates
    return config_type(
        _fastest([config_type(decode=c) for c in few], run_with([context - 1], [1])).decode,
        _fastest([config_type(decode_wide=c) for c in wide],
                 run_with([min(limits.max_seq_len, 512) // 2] * seqs, [1] * seqs)).decode_wide,
        _fastest([config_type(prefill=c) for c in prefill], run_with([0], [prompt])).prefill)


_ATTENTION_TUNERS = {"paged_attention": _attention_config, "paged_mla_attention": _mla_config}


def _gemv_choices(graph: Graph) -> dict[str, dict]:
    """Weight shape -> GEMV parameters, for the one-row ``linear`` shapes of ``graph``
    where the fastest GEMV beat cuBLAS by more than the timing noise (3%)."""
    import triton.testing

    shapes = {(*node.inputs[1].shape, node.inputs[1].dtype.torch_dtype) for node in graph.nodes
              if node.op == "linear" and node.inputs[1].is_constant}
    choices = {}
    for n, k, dtype in sorted(shapes, key=str):
        x = torch.randn(1, k, dtype=dtype, device="cuda")
        weight = torch.randn(n, k, dtype=dtype, device="cuda")
        cublas = triton.testing.do_bench(lambda: F.linear(x, weight), warmup=5, rep=20, return_mode="median")
        timed = {config: triton.testing.do_bench(lambda c=config: gemv(x, weight, None, c), warmup=5, rep=20,
                                                 return_mode="median") for config in gemv_configs()}
        config = min(timed, key=timed.get)
        if timed[config] < 0.97 * cublas:
            choices[shape_key(n, k)] = dataclasses.asdict(config)
    return choices


def _gemv_weight(node: Node) -> int | None:
    """Where ``node`` runs a tuned quantized GEMV at one row, the index of its (constant)
    weight operand: the operands before it are the row's (an input, or codes and scales)."""
    if node.op in quantized.GEMV_OPS:
        at = 1
    elif node.op == "scaled_linear" and node.inputs[0].type.dtype == dtypes.float8_e4m3fn:
        at = 2
    else:
        return None
    return at if node.inputs[at].is_constant else None


def _quantized_gemv_choices(graph: Graph) -> dict[str, dict]:
    """Quantized op -> weight shape -> the fastest GEMV's ``QuantLinearConfig`` fields,
    timed on random operands of each layer's layout."""
    layers: dict[tuple[str, str], tuple[Node, int]] = {}
    for node in graph.nodes:
        at = _gemv_weight(node)
        if at is not None:
            key = shape_key(node.inputs[at].type.shape[0], node.inputs[0].type.shape[-1])
            layers.setdefault((node.op, key), (node, at))
    choices: dict[str, dict] = {}
    for (op, key), (node, at) in sorted(layers.items()):
        operands = [_random_operand(v.type) if v is not None else None for v in node.inputs[at:]]
        row = [torch.rand(1, int(v.type.shape[-1]), device="cuda").to(v.type.dtype.torch_dtype)
               for v in node.inputs[:at]]
        launcher = (partial(scaled_linear, dtype=node.attrs["dtype"]) if op == "scaled_linear"
                    else getattr(quantized, op))
        bits = 4 if op == "linear_int4" else 8

        def run(config, launcher=launcher, row=row, operands=operands, key=key):
            return launcher(*row, *operands, config={key: quantized.QuantLinearConfig(gemv=config)})

        timed = {config: _graph_ms(lambda c=config: run(c)) for config in gemv_candidates(bits)}
        best = quantized.QuantLinearConfig(gemv=min(timed, key=timed.get))
        if op in ("linear_int8", "linear_int4"):
            best = dataclasses.replace(best, dequantize_from=_dequantize_from(launcher, row[0], operands, key))
        choices.setdefault(op, {})[key] = dataclasses.asdict(best)
    return choices


def _dequantize_from(launcher, x: torch.Tensor, operands: list, key: str) -> int:
    """The fewest rows (of 16, 64, 256) at which the dequantized weight with cuBLAS beats
    the Triton GEMM, or the default where it never does."""
    for rows in (16, 64, 256):
        xs = x.expand(rows, -1).contiguous()
        gemm, dequantized = (_graph_ms(lambda d=from_rows: launcher(xs, *operands, config={
            key: quantized.QuantLinearConfig(dequantize_from=d)})) for from_rows in (1 << 30, 1))
        if dequantized < gemm:
            return rows
    return quantized.QuantLinearConfig().dequantize_from


def _graph_ms(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph, as decode steps run."""
    import triton.testing

    fn()  # compiles outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def _random_operand(type_: TensorType) -> torch.Tensor:
    """A random tensor of a quantized layer operand's type (codes over their whole range)."""
    shape, dtype = tuple(int(d) for d in type_.shape), type_.dtype.torch_dtype
    if dtype in (torch.int8, torch.uint8):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max + 1, shape, dtype=dtype, device="cuda")
    if dtype == torch.float8_e4m3fn:
        return torch.randn(shape, device="cuda").to(dtype)
    return (torch.rand(shape, device="cuda") / 100).to(dtype)


def _fastest(candidates: list, run) -> Any:
    """The candidate configuration that ``run(config)`` runs fastest; candidates the GPU
    cannot run (too much shared memory) are skipped."""
    import triton.testing

    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - a configuration the GPU cannot run (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def random_step(cached: list[int], query_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: str = "cuda") -> tuple:
    """``paged_attention``'s operands for a step of random queries over random caches:
    sequence s holds ``cached[s]`` tokens and brings ``query_lens[s]``, in consecutive
    blocks of 16."""
    lengths = [c + n for c, n in zip(cached, query_lens)]
    per_seq = [-(-n // _BLOCK_SIZE) for n in lengths]
    starts = [sum(per_seq[:i]) for i in range(len(per_seq))]
    tables = torch.tensor([[s + j for j in range(max(per_seq))] for s in starts], dtype=torch.int32)
    slots = [(starts[i] + p // _BLOCK_SIZE) * _BLOCK_SIZE + p % _BLOCK_SIZE
             for i in range(len(lengths)) for p in range(cached[i], lengths[i])]
    tokens = sum(query_lens)
    cache_shape = (sum(per_seq) + max(per_seq), _BLOCK_SIZE, kv_heads, head_dim)

    def rand(*s):
        return torch.randn(s, dtype=dtype, device=device)

    query_start = torch.tensor([0] + [sum(query_lens[:i + 1]) for i in range(len(query_lens))], dtype=torch.int32)
    return (rand(tokens, heads, head_dim), rand(tokens, kv_heads, head_dim), rand(tokens, kv_heads, head_dim),
            rand(*cache_shape), rand(*cache_shape), torch.tensor(slots, device=device), query_start.to(device),
            torch.tensor(lengths, dtype=torch.int32, device=device), tables.to(device))


def random_mla_step(cached: list[int], query_lens: list[int], heads: int, query_dim: int, rank: int, rope: int,
                    kv_b_rows: int, dtype: torch.dtype, device: str = "cuda") -> tuple:
    """``paged_mla_attention``'s operands for a step of random queries ``[tokens, heads,
    query_dim]`` over a random latent cache of width ``rank + rope``, laid out as
    ``random_step`` lays out its caches, with a random ``kv_b [kv_b_rows, rank]``."""
    _, rows, _, cache, _, *meta = random_step(cached, query_lens, 1, 1, rank + rope, dtype, device)
    queries = torch.randn(rows.shape[0], heads, query_dim, dtype=dtype, device=device)
    kv_b = torch.randn(kv_b_rows, rank, dtype=dtype, device=device) / rank ** 0.5
    return (queries, rows[..., :rank], rows[..., rank:], kv_b, cache, *meta)
