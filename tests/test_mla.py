"""Multi-head latent attention (DeepSeek-V3): the raise rule, the paged op over a cache of
latents (the registry's reference and the reference backend's absorbed kernel), serving
through ``kiln.LLM`` (prefill, chunked prefill, decode, prefix reuse), the cache's size,
and the backends that refuse it (the CUDA backend's kernels: ``tests/test_cuda_mla.py``)."""

import pytest
import torch
from hf_models import VOCAB, random_model, write_checkpoint

import kiln
from kiln.backends.mla import paged_mla_attention
from kiln.backends.onnx import UnsupportedOpsError
from kiln.ir import Graph, TensorType, ops, sym
from kiln.ir.opdefs.mla import mla_attention_reference, paged_mla_attention_reference
from kiln.passes import MLA_RULES, rewrite
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.testing import assert_preserves

HEADS, NOPE, ROPE, V_DIM, RANK = 4, 16, 8, 16, 32
BATCH, SEQ = sym("batch"), sym("seq")


def _decompressing_graph(kv_b_constant: bool = True) -> Graph:
    """What transformers' DeepSeek attention exports to, in kiln ops, from its query, latent
    and rotated key."""
    g = Graph("mla")
    q = g.add_input("q", TensorType("f32", (BATCH, HEADS, SEQ, NOPE + ROPE)))
    latent = g.add_input("latent", TensorType("f32", (BATCH, 1, SEQ, RANK)))
    k_rope = g.add_input("k_rope", TensorType("f32", (BATCH, 1, SEQ, ROPE)))
    weight = torch.randn(HEADS * (NOPE + V_DIM), RANK, generator=torch.Generator().manual_seed(0)) * 0.2
    kv_b = g.add_constant(weight, name="kv_b") if kv_b_constant else \
        g.add_input("kv_b", TensorType("f32", tuple(weight.shape)))
    kv = ops.transpose(ops.reshape(ops.linear(latent, kv_b), shape=(BATCH, SEQ, -1, NOPE + V_DIM)), dim0=1, dim1=2)
    k_nope, values = ops.split(kv, dim=-1, sizes=(NOPE, V_DIM))
    keys = ops.concat([k_nope, ops.expand(k_rope, shape=(-1, HEADS, -1, -1))], dim=3)
    g.set_outputs([ops.attention(q, keys, values, scale=0.2, causal=True)])
    return g


def _inputs(batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, NOPE + ROPE, generator=gen), torch.randn(batch, 1, seq, RANK, generator=gen),
            torch.randn(batch, 1, seq, ROPE, generator=gen)]


def test_raise_mla_keeps_the_latent_and_the_numerics():
    graph = _decompressing_graph()
    assert rewrite(graph.clone(), MLA_RULES)["raise_mla"] == 1
    for batch, seq in ((2, 7), (1, 1)):
        raised = assert_preserves(lambda g: rewrite(g, MLA_RULES), graph, _inputs(batch, seq))
        assert raised.op_counts() == {"mla_attention": 1}
        assert [v.name for v in raised.nodes[0].inputs] == ["q", "latent", "k_rope", "kv_b"]


def test_raise_mla_needs_a_weight():
    graph = _decompressing_graph(kv_b_constant=False)
    assert not rewrite(graph, MLA_RULES) and "mla_attention" not in graph.op_counts()


def _features(length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(length, HEADS, NOPE + ROPE, generator=gen), torch.randn(length, 1, RANK, generator=gen),
            torch.randn(length, 1, ROPE, generator=gen))


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_kernels_match_attention_over_the_whole_sequence(block_size):
    """Two steps of a mixed batch (prefill, chunked prefill, decode) over a NaN-filled cache
    with blocks out of order: the registry's reference and the absorbed kernel give what
    latent attention over each whole sequence gives, and write the same cache."""
    kv_b = torch.randn(HEADS * (NOPE + V_DIM), RANK, generator=torch.Generator().manual_seed(9)) * 0.2
    lengths = {"a": 5, "b": 8, "c": 10}
    seqs = {name: _features(n, seed) for seed, (name, n) in enumerate(lengths.items())}
    needed = {name: -(-n // block_size) for name, n in lengths.items()}
    order = torch.randperm(sum(needed.values()), generator=torch.Generator().manual_seed(block_size)).tolist()
    blocks = {name: [order.pop() for _ in range(count)] for name, count in needed.items()}  # out of order
    full = {name: mla_attention_reference(q.transpose(0, 1)[None], latent.transpose(0, 1)[None],
                                          k_rope.transpose(0, 1)[None], kv_b, 0.2)[0].transpose(0, 1)
            for name, (q, latent, k_rope) in seqs.items()}
    caches = {"reference": torch.full((sum(needed.values()), block_size, 1, RANK + ROPE), float("nan"))}
    caches["kernel"] = caches["reference"].clone()
    # step 1: b's first 7 tokens, c's first chunk of 6; step 2: a whole, b decodes, c's second chunk
    for step in ([("b", 0, 7), ("c", 0, 6)], [("a", 0, 5), ("b", 7, 8), ("c", 6, 10)]):
        meta = step_inputs([SequenceStep([0] * (end - start), start, blocks[name]) for name, start, end in step],
                           block_size, all_logits=True)
        operands = [torch.cat([seqs[name][i][start:end] for name, start, end in step]) for i in range(3)]
        args = (meta["slot_mapping"], meta["query_start"], meta["context_lens"], meta["block_tables"])
        want = torch.cat([full[name][start:end] for name, start, end in step])
        out, caches["reference"] = paged_mla_attention_reference(*operands, kv_b, caches["reference"], *args, 0.2)
        fast, caches["kernel"] = paged_mla_attention(*operands, kv_b, caches["kernel"], *args, 0.2)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches["kernel"], caches["reference"], equal_nan=True)


def _compiled(name, tmp_path_factory):
    model = random_model(name)
    path = write_checkpoint(model, tmp_path_factory.mktemp(name))
    return model, path, kiln.compile(path, dtype="float32", max_seq_len=64)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return _compiled("deepseek-v3", tmp_path_factory)


@pytest.fixture(scope="module", params=["deepseek-v3", "deepseek-v2-lite"])
def latent(request, tmp_path_factory):
    """DeepSeek-V3, and DeepSeek-V2 (its rotary written as complex multiplication, its
    queries without a low-rank projection)."""
    if request.param == "deepseek-v3":
        return request.getfixturevalue("deepseek")
    return _compiled(request.param, tmp_path_factory)


def test_the_cache_holds_latents_only(latent):
    model, _, engine = latent
    config = model.config
    assert engine.cache_spec.names == ("latent_cache_0", "latent_cache_1")
    per_token = engine.cache_spec.bytes_per_token()
    assert per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    heads_kv = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    assert config.num_hidden_layers * heads_kv * 4 == 4 * per_token  # what per-head keys and values would take


def test_llm_serves_chunked_prefill_decode_and_prefix_reuse(latent):
    model, _, engine = latent
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (13, 6)]
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    llm = kiln.LLM(engine, kiln.RuntimeConfig(num_blocks=24, block_size=4, max_num_tokens=8))  # 13 tokens: 2 chunks
    params = kiln.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = llm.generate(prompts, params)
    again = llm.generate(prompts[:1], params)[0]
    assert [r.token_ids for r in first] == want
    assert again.cached_tokens == 12 and again.token_ids == want[0]


def test_backends_without_latent_attention_refuse_it(deepseek, tmp_path):
    """ONNX and TensorRT refuse it, and an E4M3 latent cache is refused; the CUDA backend
    serves it (``tests/test_cuda_mla.py``)."""
    from kiln.backends.tensorrt.table import NOT_LOWERED

    _, path, engine = deepseek
    with pytest.raises(UnsupportedOpsError, match="paged_mla_attention"):
        engine.export_onnx(tmp_path / "step.onnx")
    assert "multi-head latent attention" in NOT_LOWERED["paged_mla_attention"]
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' does not apply to caches latent_cache_0, "
                                         "latent_cache_1 yet"):
        kiln.compile(path, dtype="float32", max_seq_len=64, kv_cache_dtype="fp8")

