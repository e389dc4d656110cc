"""The main job until the bundled model exists: build a small Llama-style decoder layer
as a kiln graph with random weights, run the cleanup pipeline, and run it with the
interpreter, before and after, on a batch of token ids."""

from __future__ import annotations

import time

import torch

from .ir import Graph, TensorType, Value, dtypes, interpret, ops, sym
from .passes import format_records, pipeline_manager


def decoder_graph(vocab: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                  ffn: int = 64, seed: int = 0) -> Graph:
    """One pre-norm decoder layer with grouped-query attention, rotary embedding and a
    SwiGLU MLP, written as frontends import it: with the casts and reshapes they leave."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = sym("batch"), sym("seq")
    head_dim = hidden // heads
    g = Graph("decoder")
    ids = g.add_input("ids", TensorType(dtypes.int64, (batch, seq)))
    angles = g.add_input("angles", TensorType(dtypes.float32, (seq, head_dim)))

    def weight(name: str, *shape: int) -> Value:
        return g.add_constant(torch.randn(*shape, generator=gen) / shape[-1] ** 0.5, name=name)

    x = ops.embedding(ids, weight("embed", vocab, hidden))
    h = ops.rms_norm(ops.cast(ops.cast(x, dtype="f32"), dtype="f32"), weight("norm1", hidden) * 0.0 + 1.0)
    q, k, v = (ops.linear(h, weight(n, d * head_dim, hidden)) for n, d in
               (("wq", heads), ("wk", kv_heads), ("wv", kv_heads)))

    def heads_first(t: Value, n: int) -> Value:
        return ops.transpose(ops.reshape(t, shape=(batch, seq, n, head_dim)), dim0=1, dim1=2)

    cos, sin = ops.cos(angles), ops.sin(angles)
    q = ops.rotary(heads_first(q, heads), cos, sin)
    k = ops.rotary(heads_first(k, kv_heads), cos, sin)
    att = ops.attention(q, k, heads_first(v, kv_heads), causal=True)
    att = ops.reshape(ops.transpose(att, dim0=1, dim1=2), shape=(batch, seq, hidden))
    x = x + ops.linear(att, weight("wo", hidden, hidden)) * 1.0
    h = ops.rms_norm(x, weight("norm2", hidden))
    mlp = ops.silu(ops.linear(h, weight("gate", ffn, hidden))) * ops.linear(h, weight("up", ffn, hidden))
    x = x + ops.linear(mlp, weight("down", hidden, ffn))
    logits = ops.linear(ops.rms_norm(x, weight("norm_f", hidden)), weight("lm_head", vocab, hidden))
    g.set_outputs([logits])
    return g


def run_demo(batch: int = 2, seq: int = 8) -> None:
    """Print the graph before and after the cleanup pipeline, and check they agree."""
    graph = decoder_graph()
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, 4, dtype=torch.float32) / 4)
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    before = interpret(graph, [ids, angles])[0]
    print(f"// imported: {len(graph.nodes)} nodes\n{graph}")
    start = time.perf_counter()
    records = pipeline_manager("cleanup", debug=True).run(graph)
    elapsed = time.perf_counter() - start
    print(f"// after the cleanup pipeline ({elapsed * 1e3:.1f} ms): {len(graph.nodes)} nodes\n{graph}")
    print(format_records(records))
    after = interpret(graph, [ids, angles])[0]
    diff = (after - before).abs().max().item()
    print(f"\nlogits {tuple(after.shape)}; max |difference| before/after passes: {diff:.2e}")
    print("greedy next tokens:", after[:, -1].argmax(-1).tolist())
