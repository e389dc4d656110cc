"""Llama 4's pieces: chunked local attention in both attention references and the reference
backend's paged kernel, complex tensors imported as real pairs, the router's scatter of the
top-k logits, the CUDA target's Triton kernels serving the model (under Triton's interpreter
on a CPU) with transformers' greedy tokens, and the backends that refuse chunked attention by
name. (The raise of complex products into interleaved rotary is in test_complex_rotary.py;
the whole model against transformers in test_frontend_hf.py and test_paged.py, config
"llama4".)"""

import torch
from cuda_serving import assert_serves_transformers_greedy, compile_for_cuda
from hf_models import random_model, write_checkpoint
from test_alibi import _mixed_batch
from torch import nn
from torch.export import Dim

import kiln
from kiln.backends import reference_kernels
from kiln.ir.opdefs.nn import attention_reference
from kiln.ir.opdefs.paged import paged_attention_reference


def _chunk_mask(queries: int, keys: int, chunk: int) -> torch.Tensor:
    """Causal (the last query at the last key) and within the query's chunk of positions."""
    query_pos = torch.arange(queries)[:, None] + keys - queries
    key_pos = torch.arange(keys)[None, :]
    return (key_pos <= query_pos) & (key_pos // chunk == query_pos // chunk)


def test_attention_reference_attends_within_chunks():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 8, generator=gen) for h, s in ((4, 5), (2, 11), (2, 11)))
    got = attention_reference(q, k, v, None, None, True, None, None, chunk_size=3)
    want = attention_reference(q, k, v, _chunk_mask(5, 11, 3), None, False, None, None)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, attention_reference(q, k, v, None, None, True, None, None), atol=1e-3)


def test_paged_attention_with_chunks_matches_attention_per_sequence():
    """A decode at position 9 (its chunk: 8, 9) and a chunk of positions 4..6 (theirs: 4..)."""
    args, keys, values = _mixed_batch()
    q, starts = args[0], args[6]
    out = paged_attention_reference(*args, chunk_size=4)[0]
    for s in range(2):
        rows = slice(int(starts[s]), int(starts[s + 1]))
        heads = [t.transpose(0, 1)[None] for t in (q[rows], keys[s], values[s])]
        want = attention_reference(*heads, None, None, True, None, None, chunk_size=4)[0].transpose(0, 1)
        assert torch.allclose(out[rows], want, atol=1e-6)
    batched = reference_kernels()["paged_attention"](*args, chunk_size=4)[0]
    assert torch.allclose(batched, out, atol=1e-5)
    assert not torch.allclose(batched, paged_attention_reference(*args)[0], atol=1e-3)


class ComplexRotary(nn.Module):
    """Rotary embedding as Llama 4 writes it, with more of the complex ops export leaves."""

    def __init__(self):
        super().__init__()
        self.inv_freq = nn.Buffer(1.0 / 100 ** (torch.arange(0, 8, 2) / 8))

    def forward(self, x):  # x [batch, seq, heads, 8]
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        freqs = torch.polar(torch.ones_like(angles), angles) * 0.5 + torch.complex(angles.cos(), angles.sin()) * 0.5
        freqs = freqs[None]  # [1, seq, 4]: a sum of complex tensors, each scaled by a number
        freqs = freqs.transpose(0, 1).reshape(x.shape[1], 1, 4).transpose(0, 1)  # view, transpose round trip
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        turned = pairs * freqs[:, :, None, :] + pairs[:, :, :, :]  # product, sum, slice of a complex tensor
        return torch.view_as_real(turned).flatten(3)


def test_complex_tensors_import_as_real_pairs():
    seq = Dim("seq", min=2, max=32)
    compiled = kiln.compile(ComplexRotary(), example_inputs=[torch.randn(2, 6, 3, 8)],
                            dynamic_shapes=({1: seq},))
    x = torch.randn(2, 11, 3, 8)
    assert torch.allclose(compiled(x), ComplexRotary()(x), atol=1e-6)


class TopKScores(nn.Module):
    """Llama 4's router: the top-k logits scattered into -inf, then a sigmoid."""

    def forward(self, logits):
        values, indices = torch.topk(logits, 2, dim=1)
        return torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, indices, values))


def test_router_scatter_of_the_top_logits():
    compiled = kiln.compile(TopKScores(), example_inputs=[torch.randn(5, 6)], dynamic_shapes=({0: Dim("t")},))
    logits = torch.randn(9, 6)
    assert torch.equal(compiled(logits), TopKScores()(logits))


def test_cuda_target_serves_llama4_with_transformers_greedy_tokens(tmp_path):
    """The CUDA target builds Llama 4 (chunked attention of 4 positions, experts that weigh
    their inputs) and its Triton kernels (Triton's interpreter on a CPU) serve two prompts
    that cross chunks and blocks, then decode, with transformers' logits and greedy tokens."""
    model = random_model("llama4")
    engine = compile_for_cuda(model, tmp_path)
    raised = [(n.op, n.attrs.get("chunk_size"), n.attrs.get("weigh_inputs")) for n in engine.graph.nodes
              if n.op in ("paged_attention", "moe")]
    assert raised == [("paged_attention", 4, None), ("paged_attention", None, None), ("moe", None, True)]
    assert_serves_transformers_greedy(engine, model, [[5, 9, 13, 200, 7, 1, 2, 3, 4, 5, 6], [33, 34, 35]],
                                      [[3, 0, 7, 5, 11], [1, 10, 2, 6]])


def test_onnx_and_tensorrt_refuse_chunked_attention(tmp_path):
    from kiln.backends.onnx.table import unexportable
    from kiln.backends.tensorrt.table import _no_window_or_softcap

    checkpoint = write_checkpoint(random_model("llama4"), tmp_path)
    engine = kiln.compile(checkpoint, dtype="float32", max_seq_len=64)
    chunked = [n for n in engine.graph.nodes if n.op == "paged_attention"]
    assert [n.attrs["chunk_size"] for n in chunked] == [4, None]  # layer 1 is a NoPE layer of full attention
    assert "chunk_size" in unexportable(chunked[0]) and "chunk_size" in _no_window_or_softcap(chunked[0])
