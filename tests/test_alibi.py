"""ALiBi attention: the slopes against BLOOM's and MPT's, the attention and paged-attention
references with ALiBi, the raise of written-out attention and of attention given a
positional mask (IR text in, one attention op out, numerics kept), the backends that
refuse ALiBi by name, and the CUDA target serving BLOOM and MPT with its Triton kernels."""

import pytest
import torch
from cuda_serving import assert_serves_transformers_greedy, compile_for_cuda
from hf_models import random_model

from kiln.backends import BackendSupportError, check_backend_support, reference_kernels
from kiln.backends.support import REFUSED_ATTRIBUTES
from kiln.ir import ops
from kiln.ir.opdefs.nn import alibi_slopes, attention_reference
from kiln.ir.opdefs.paged import paged_attention_reference
from kiln.passes import PartitionError, partition_tensor_parallel, raise_written_attention
from kiln.testing import assert_preserves, graph_from_text, random_inputs


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 40])
def test_slopes_are_bloom_and_mpt_slopes(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    slopes = alibi_slopes(heads, 8.0)
    assert torch.allclose(slopes, _get_alibi_slopes(heads, "cpu"), rtol=1e-6)
    mpt = build_mpt_alibi_tensor(heads, 2)[:, 0, 0]  # slope * (0 - 1)
    assert torch.allclose(slopes, -mpt, rtol=1e-6)


def _written_alibi(q, k, v, slopes, causal=True):
    """ALiBi attention as BLOOM writes it: the bias grows with the key's position."""
    heads, seq = q.shape[1], q.shape[2]
    k, v = (t.repeat_interleave(heads // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + slopes[:, None, None] * torch.arange(seq)
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_reference_adds_the_alibi_bias():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen) for h in (6, 3, 3))
    got = attention_reference(q, k, v, None, None, True, None, None, alibi_bias_max=8.0)
    assert torch.allclose(got, _written_alibi(q, k, v, alibi_slopes(6, 8.0)), atol=1e-6)
    plain = attention_reference(q, k, v, None, None, True, None, None)
    assert not torch.allclose(got, plain, atol=1e-3)


def _mixed_batch(heads=6, kv_heads=3, dim=8, block_size=4):
    """A decode at position 9 of one sequence and a chunk at positions 4..6 of another,
    their earlier keys and values already in the cache; also each sequence's full keys
    and values."""
    gen = torch.Generator().manual_seed(1)
    lengths, new = [10, 7], [1, 3]
    keys, values = ([torch.randn(n, kv_heads, dim, generator=gen) for n in lengths] for _ in range(2))
    q = torch.randn(sum(new), heads, dim, generator=gen)
    tables = torch.tensor([[5, 0, 2], [3, 6, 1]], dtype=torch.int32)
    slots = [tables[s, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
             for s, n in enumerate(lengths)]
    k_cache, v_cache = (torch.zeros(8, block_size, kv_heads, dim) for _ in range(2))
    for s, n in enumerate(lengths):
        old = slots[s][: n - new[s]]
        k_cache.view(-1, kv_heads, dim)[old], v_cache.view(-1, kv_heads, dim)[old] = keys[s][: n - new[s]], \
            values[s][: n - new[s]]
    step = [torch.cat([t[-n:] for t, n in zip(ts, new)]) for ts in (keys, values, slots)]
    args = (q, step[0], step[1], k_cache, v_cache, step[2], torch.tensor([0, 1, 4], dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int32), tables, None, None, None)
    return args, keys, values


def test_paged_attention_with_alibi_matches_attention_per_sequence():
    args, keys, values = _mixed_batch()
    q, starts = args[0], args[6]
    out = paged_attention_reference(*args, alibi_bias_max=8.0)[0]
    for s in range(2):
        rows = slice(int(starts[s]), int(starts[s + 1]))
        heads = [t.transpose(0, 1)[None] for t in (q[rows], keys[s], values[s])]
        want = attention_reference(*heads, None, None, True, None, None, alibi_bias_max=8.0)[0].transpose(0, 1)
        assert torch.allclose(out[rows], want, atol=1e-6)
    batched = reference_kernels()["paged_attention"](*args, alibi_bias_max=8.0)[0]
    assert torch.allclose(batched, out, atol=1e-5)


WRITTEN_BODY = """\
  %slopes = constant [{slopes}] : f32[4, 1, 1]
  %zero = constant [0.0] : f32[]
  %min = constant [-3.4028234663852886e+38] : f32[]
  %scale = constant [0.35355339059327373] : f32[]
  %width = constant [3] : i64[]
  %pos = arange() {{end = seq}} : i64[seq]
  %posf = cast(%pos) {{dtype = f32}} : f32[seq]
  %bias = mul(%slopes, %posf) : f32[4, 1, seq]
  %query = unsqueeze(%pos) {{dim = 1}} : i64[seq, 1]
  %key = unsqueeze(%pos) {{dim = 0}} : i64[1, seq]
  %causal = le(%key, %query) : bool[seq, seq]
  %start = sub(%query, %width) : i64[seq, 1]
  %recent = gt(%key, %start) : bool[seq, seq]
  %window = logical_and(%causal, %recent) : bool[seq, seq]
  %mask = where(%{allowed}, %zero, %min) : f32[seq, seq]
  %kk = reshape(%k) {{shape = [batch, 2, 1, seq, 8]}} : f32[batch, 2, 1, seq, 8]
  %kx = expand(%kk) {{shape = [batch, 2, 2, seq, 8]}} : f32[batch, 2, 2, seq, 8]
  %keys = reshape(%kx) {{shape = [batch, 4, seq, 8]}} : f32[batch, 4, seq, 8]
  %vv = reshape(%v) {{shape = [batch, 2, 1, seq, 8]}} : f32[batch, 2, 1, seq, 8]
  %vx = expand(%vv) {{shape = [batch, 2, 2, seq, 8]}} : f32[batch, 2, 2, seq, 8]
  %values = reshape(%vx) {{shape = [batch, 4, seq, 8]}} : f32[batch, 4, seq, 8]
  %kt = transpose(%keys) {{dim0 = -1, dim1 = -2}} : f32[batch, 4, 8, seq]
  %scores = matmul(%q, %kt) : f32[batch, 4, seq, seq]
  %scaled = mul(%scores, %scale) : f32[batch, 4, seq, seq]
  %biased = add(%scaled, %bias) : f32[batch, 4, seq, seq]
  %logits = add(%biased, %mask) : f32[batch, 4, seq, seq]
  %probs = softmax(%logits) {{dim = -1}} : f32[batch, 4, seq, seq]
  %out = matmul(%probs, %values) : f32[batch, 4, seq, 8]
"""
WRITTEN = ("graph @g(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, seq, 8], %v: f32[batch, 2, seq, 8]) {{\n"
           + WRITTEN_BODY + "  return %out\n}}\n")
# the same attention inside a causal LM graph (token ids in, logits out)
WRITTEN_LM = ("graph @lm(%ids: i64[batch, seq]) {{\n"
              "  %table = constant : f32[16, 32]\n"
              "  %x = embedding(%ids, %table) : f32[batch, seq, 32]\n"
              "  %h = reshape(%x) {{shape = [batch, seq, 4, 8]}} : f32[batch, seq, 4, 8]\n"
              "  %q = transpose(%h) {{dim0 = 1, dim1 = 2}} : f32[batch, 4, seq, 8]\n"
              "  %k = slice(%q) {{dim = 1, end = 2}} : f32[batch, 2, seq, 8]\n"
              "  %v = slice(%q) {{dim = 1, start = 2}} : f32[batch, 2, seq, 8]\n"
              + WRITTEN_BODY +
              "  %t = transpose(%out) {{dim0 = 1, dim1 = 2}} : f32[batch, seq, 4, 8]\n"
              "  %hidden = reshape(%t) {{shape = [batch, seq, 32]}} : f32[batch, seq, 32]\n"
              "  return %hidden\n}}\n")
ALIBI_4 = ", ".join(str(float(s)) for s in alibi_slopes(4, 8.0))


@pytest.mark.parametrize("slopes, bias_max", [(ALIBI_4, 8.0), ("0.0, 0.0, 0.0, 0.0", None)])
def test_written_attention_is_raised(slopes, bias_max):
    graph = graph_from_text(WRITTEN.format(slopes=slopes, allowed="causal"))
    for size, seed in ((3, 0), (11, 1)):
        raised = assert_preserves(raise_written_attention, graph, random_inputs(graph, size, seed), atol=1e-5)
    counts = raised.op_counts()
    assert counts["attention"] == 1 and "softmax" not in counts and "arange" not in counts
    node = next(n for n in raised.nodes if n.op == "attention")
    assert node.attrs["causal"] and node.attrs["alibi_bias_max"] == bias_max
    assert node.attrs["scale"] == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("slopes, allowed", [(ALIBI_4, "window"), ("0.3, 0.3, 0.3, 0.3", "causal")])
def test_other_biases_stay_written_out(slopes, allowed):
    """A sliding window of 3 (wider than neither checked length hides it) and linear biases
    that are not ALiBi's slopes are not attention attributes: nothing is raised."""
    graph = graph_from_text(WRITTEN.format(slopes=slopes, allowed=allowed))
    assert raise_written_attention(graph) == 0 and "attention" not in graph.op_counts()


MASKED_SDPA = """
graph @g(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, seq, 8], %v: f32[batch, 2, seq, 8]) {
  %pos = arange() {end = seq} : i64[seq]
  %query = unsqueeze(%pos) {dim = 1} : i64[seq, 1]
  %key = unsqueeze(%pos) {dim = 0} : i64[1, seq]
  %causal = le(%key, %query) : bool[seq, seq]
  %out = attention(%q, %k, %v, %causal) {softcap = 5.0} : f32[batch, 4, seq, 8]
  return %out
}
"""


def test_an_attention_given_a_causal_mask_takes_it_as_an_attribute():
    """SDPA called with the causal mask a model built (Falcon under transformers' sdpa)."""
    graph = graph_from_text(MASKED_SDPA)
    for size, seed in ((4, 0), (9, 1)):
        raised = assert_preserves(raise_written_attention, graph, random_inputs(graph, size, seed))
    node = next(n for n in raised.nodes if n.op == "attention")
    assert node.inputs[3:] in ([], [None]) and node.attrs["causal"] and node.attrs["softcap"] == 5.0
    assert raised.op_counts() == {"attention": 1}


def test_paging_names_written_out_attention_it_could_not_raise():
    from kiln.passes import PagedAttentionError, page_attention

    graph = graph_from_text(WRITTEN_LM.format(slopes="0.3, 0.3, 0.3, 0.3", allowed="causal"))
    assert raise_written_attention(graph) == 0
    with pytest.raises(PagedAttentionError, match="no attention to page: the softmax at .* may be attention "
                                                  "written out"):
        page_attention(graph)


def _attention_graph(alibi_bias_max):
    from kiln.ir import Graph, TensorType, sym

    graph = Graph("g")
    q = graph.add_input("q", TensorType("float32", (sym("batch"), 4, sym("seq"), 8)))
    graph.set_outputs([ops.attention(q, q, q, causal=True, alibi_bias_max=alibi_bias_max)])
    return graph


def test_tensor_parallelism_refuses_alibi():
    with pytest.raises(PartitionError, match="ALiBi"):
        partition_tensor_parallel(_attention_graph(8.0), 2, strict=True)


def test_tensorrt_and_onnx_refuse_alibi_by_name():
    from kiln.backends.onnx.table import unexportable
    from kiln.backends.tensorrt.table import _no_window_or_softcap

    node = _attention_graph(8.0).outputs[0].producer
    assert "ALiBi" in unexportable(node) and "ALiBi" in _no_window_or_softcap(node)
    plain = _attention_graph(None).outputs[0].producer
    assert unexportable(plain) is None and _no_window_or_softcap(plain) is None


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_cuda_target_serves_alibi_models_with_transformers_greedy_tokens(name, tmp_path):
    """BLOOM and MPT (ALiBi over 6 heads: not a power of two) built for target "cuda", their
    Triton kernels (Triton's interpreter on a CPU) serving a prefill across blocks beside a
    short one, then decodes, with transformers' logits and greedy tokens."""
    model = random_model(name)
    engine = compile_for_cuda(model, tmp_path)
    assert [n.attrs["alibi_bias_max"] for n in engine.graph.nodes if n.op == "paged_attention"] == [8.0, 8.0]
    assert_serves_transformers_greedy(engine, model, [[5, 9, 13, 200, 7, 1, 2, 3, 4], [33, 34]],
                                      [[3, 0, 7, 5], [1, 10, 2]])


def test_a_backend_names_the_attributes_it_refuses(monkeypatch):
    monkeypatch.setitem(REFUSED_ATTRIBUTES, "cuda", {"attention": {"alibi_bias_max": "ALiBi biases"}})
    with pytest.raises(BackendSupportError, match=r"target 'h100' cannot build graph @g: the cuda backend refuses\n"
                                                  r"  - attention \(at <top level>, alibi_bias_max=8.0\): ALiBi "
                                                  r"biases\ntarget 'cpu' serves it"):
        check_backend_support(_attention_graph(8.0), "cuda", "h100")
    check_backend_support(_attention_graph(None), "cuda", "h100")
