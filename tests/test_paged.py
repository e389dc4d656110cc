"""The paged-attention pass: one step graph serves prefill, chunked prefill and decode of
a mixed batch; its logits equal full recomputation and transformers for every verified
architecture."""

import pytest
import torch
from hf_models import ARCHITECTURES, VOCAB, random_model

from kiln.frontends.huggingface import import_model
from kiln.ir import interpret, ops, sym, verify
from kiln.passes import PagedAttentionError, linear_kv_cache, page_attention, pipeline_manager
from kiln.runtime.batch import SequenceStep, step_inputs

TOLERANCE = 1e-4


def _paged_graph(model, pipeline="reference"):
    graph = import_model(model).graph
    pipeline_manager(pipeline, debug=True).run(graph)
    verify(graph)
    return graph


def _caches(graph, blocks, block_size):
    """Every cache input, filled with NaN: reading a slot nobody wrote poisons the result."""
    return {v.name: torch.full((blocks, block_size, *v.shape[2:]), float("nan"), dtype=v.dtype.torch_dtype)
            for v in graph.inputs if "cache" in v.name}


def _step(graph, caches, steps, block_size, all_logits=True):
    """Run one step; return each sequence's logits (of all its new tokens, or its last)."""
    inputs = step_inputs(steps, block_size, all_logits)
    outputs = interpret(graph, {**inputs, **caches})
    names = [v.name for v in graph.inputs if "cache" in v.name]
    caches.update(zip(names, outputs[1:]))
    if not all_logits:
        return list(outputs[0][:, None])
    bounds = inputs["query_start"].tolist()
    return [outputs[0][a:b] for a, b in zip(bounds, bounds[1:])]


def _assert_mixed_batch_matches(name, model, graph, block_size, blocks):
    """Three steps of a mixed batch (prefill, chunked prefill, decode) against full recomputation."""
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 8, 10))
    with torch.no_grad():
        full = {key: model(input_ids=torch.tensor([seq]), use_cache=False).logits[0] for key, seq in
                (("a", a), ("b", b), ("c", c))}
    caches = _caches(graph, 1 + max(max(ids) for ids in blocks.values()), block_size)
    # step 1: b's prompt (7 tokens), c's first chunk (6 of 10)
    b1, c1 = _step(graph, caches, [SequenceStep(b[:7], 0, blocks["b"]), SequenceStep(c[:6], 0, blocks["c"])],
                   block_size)
    # step 2: a's whole prompt, b decodes its 8th token, c's second chunk
    a2, b2, c2 = _step(graph, caches, [SequenceStep(a, 0, blocks["a"]), SequenceStep(b[7:], 7, blocks["b"]),
                                       SequenceStep(c[6:], 6, blocks["c"])], block_size)
    # step 3: only each sequence's last logits, as the runtime asks for them
    a3, b3 = _step(graph, caches, [SequenceStep(a[:1], 5, blocks["a"]), SequenceStep(b[:2], 8, blocks["b"])],
                   block_size, all_logits=False)
    with torch.no_grad():
        longer = {key: model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1:] for key, seq in
                  (("a", a + a[:1]), ("b", b + b[:2]))}
    for got, want, what in [(b1, full["b"][:7], "b prefill"), (c1, full["c"][:6], "c chunk 1"),
                            (a2, full["a"], "a prefill beside decodes"), (b2, full["b"][7:], "b decode"),
                            (c2, full["c"][6:], "c chunk 2"), (a3, longer["a"], "a decode, last logits"),
                            (b3, longer["b"], "b chunk, last logits")]:
        diff = (got - want).abs().max().item()
        assert diff <= TOLERANCE, f"{name}, {what}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_mixed_batch_matches_full_recomputation(name):
    model = random_model(name)
    graph = _paged_graph(model)
    counts = graph.op_counts()
    assert counts.get("paged_attention", 0) + counts.get("paged_mla_attention", 0) == model.config.num_hidden_layers
    assert "attention" not in counts and "mla_attention" not in counts
    blocks = {"a": [3, 11], "b": [5, 2, 6], "c": [7, 1, 9]}  # out of order on purpose
    _assert_mixed_batch_matches(name, model, graph, 4, blocks)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "phi"])
def test_linear_caches_serve_the_same_mixed_batch(name):
    model = random_model(name)
    graph = _paged_graph(model, "tensorrt")
    tables = next(v for v in graph.inputs if v.name == "block_tables")
    assert tables.shape[1] == 1 and graph.inputs[-1].shape[:2] == (sym("num_slots"), sym("max_seq_len"))
    assert linear_kv_cache(graph) == 0
    _assert_mixed_batch_matches(name, model, graph, 16, {"a": [2], "b": [0], "c": [1]})


def test_the_step_graph_takes_any_block_size():
    model = random_model("mistral")  # sliding window 5 crosses blocks
    graph = _paged_graph(model)
    tokens = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    for block_size in (1, 3, 16):
        caches = _caches(graph, 14, block_size)
        blocks = list(range(13, 13 - -(-12 // block_size), -1))
        first = _step(graph, caches, [SequenceStep(tokens[:9], 0, blocks)], block_size)[0]
        rest = [_step(graph, caches, [SequenceStep([t], 9 + i, blocks)], block_size)[0] for i, t in
                enumerate(tokens[9:])]
        got = torch.cat([first, *rest])
        assert (got - want).abs().max().item() <= TOLERANCE, f"block size {block_size}"


def test_paging_is_idempotent_and_refuses_other_graphs(graph_with_input):
    graph = _paged_graph(random_model("llama"))
    text = str(graph)
    assert page_attention(graph) == 0 and str(graph) == text
    g, x = graph_with_input
    g.set_outputs([ops.relu(x)])
    with pytest.raises(PagedAttentionError, match="token ids \\[batch, seq\\] as its only input"):
        page_attention(g)


def test_step_inputs_refuse_too_few_blocks():
    with pytest.raises(ValueError, match="needs 3 blocks of 4, it has 2"):
        step_inputs([SequenceStep(list(range(9)), 0, [0, 1])], 4)
