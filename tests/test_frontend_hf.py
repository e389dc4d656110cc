"""Hugging Face checkpoints: logits equal transformers' for every verified architecture,
sharded and in-memory models, the bundled model, and a clear error for each kind of bad
checkpoint."""

import json
import shutil

import pytest
import torch
from hf_models import ARCHITECTURES, BUNDLED, VOCAB, random_model, write_checkpoint
from safetensors.torch import load_file, save_file

import kiln
from kiln.frontends import FrontendError

TOLERANCE = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_logits_and_greedy_tokens_match_transformers(name, tmp_path):
    model = random_model(name)
    engine = kiln.compile(write_checkpoint(model, tmp_path), dtype="float32", max_seq_len=64)
    for batch, seq in ((3, 17), (1, 1)):  # neither is the traced shape (2, 8)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        diff = (engine.logits(ids) - _logits(model, ids)).abs().max().item()
        assert diff <= TOLERANCE, f"{name} at {batch}x{seq}: max abs diff {diff:.2e}"
    assert engine.info.architecture == type(model).__name__
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0)[0, 6:].tolist()
    params = kiln.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert kiln.LLM(engine).generate([prompt[0].tolist()], params)[0].token_ids == want


def test_sharded_checkpoint(tmp_path):
    model = random_model("llama")
    write_checkpoint(model, tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, VOCAB, (2, 9))
    engine = kiln.compile(tmp_path, dtype="float32", max_seq_len=64)
    assert (engine.logits(ids) - _logits(model, ids)).abs().max().item() <= TOLERANCE


def test_in_memory_model_keeps_its_attention_setting():
    model = random_model("qwen2")
    before = model.config._attn_implementation
    engine = kiln.compile(model, max_seq_len=64)
    ids = torch.randint(0, VOCAB, (2, 11))
    assert (engine.logits(ids) - _logits(model, ids)).abs().max().item() <= TOLERANCE
    assert model.config._attn_implementation == before


def test_weights_are_read_lazily(tmp_path):
    engine = kiln.compile(write_checkpoint(random_model("llama"), tmp_path), dtype="float32", max_seq_len=64)
    weights = [v for v in engine.graph.constants.values() if not v.is_literal]
    assert weights and all(type(v.data).__name__ in ("LazyData", "FoldedData") for v in weights)


def test_bundled_model_matches_transformers_token_for_token():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    engine = kiln.compile(BUNDLED, max_seq_len=256)
    prompt = "Python uses the"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert (engine.logits(ids) - _logits(model, ids)).abs().max().item() <= TOLERANCE
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    result = kiln.LLM(engine).generate(prompt, kiln.SamplingParams(max_tokens=24, temperature=0))[0]
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_engine_limits():
    engine = kiln.compile(BUNDLED, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the engine's limits"):
        engine.logits(torch.zeros(3, 4, dtype=torch.long))
    llm = kiln.LLM(engine)
    with pytest.raises(ValueError, match="serves at most 15"):
        llm.generate([list(range(16))])
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([""])


def _break(tmp_path, how):
    model = random_model("llama")
    write_checkpoint(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    if how == "not a directory":
        return tmp_path / "nope"
    if how == "no config":
        (tmp_path / "config.json").unlink()
    elif how == "unknown model type":
        config = json.loads((tmp_path / "config.json").read_text())
        config["model_type"] = "frobnicator"
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif how == "not a causal LM":
        from transformers import T5Config

        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path)
        save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
        write_checkpoint.__globals__["copy_tokenizer"](tmp_path)
    elif how in ("missing tensor", "mis-shaped tensor", "unknown dtype"):
        tensors = load_file(weights)
        if how == "missing tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif how == "mis-shaped tensor":
            tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
        else:
            tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e5m2)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "corrupt safetensors":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif how == "pickle only":
        weights.unlink()
        (tmp_path / "pytorch_model.bin").write_bytes(b"")
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name).unlink()
    return tmp_path


@pytest.mark.parametrize("how, message", [
    ("not a directory", "is not a directory"),
    ("no config", "has no config.json"),
    ("unknown model type", "cannot read .*config.json"),
    ("not a causal LM", "unsupported architecture .*T5"),
    ("missing tensor", r"missing tensor model.layers.1.mlp.up_proj.weight \[128, 64\]"),
    ("mis-shaped tensor", r"tensor model.layers.0.self_attn.q_proj.weight is \[64, 32\] in model.safetensors, "
                          r"the model needs \[64, 64\]"),
    ("unknown dtype", "tensor model.norm.weight in model.safetensors has dtype F8_E5M2, which kiln cannot load"),
    ("corrupt safetensors", "model.safetensors is not a valid safetensors file"),
    ("pickle only", r"no safetensors weights \(found pytorch_model.bin: kiln loads no pickle files\)"),
    ("no tokenizer", "has no tokenizer"),
])
def test_bad_checkpoints_are_named(tmp_path, how, message):
    with pytest.raises(FrontendError, match=message):
        kiln.compile(_break(tmp_path, how), dtype="float32", max_seq_len=64)


def test_compile_refuses_what_it_cannot_build_yet():
    with pytest.raises(ValueError, match="target 'l40s' is not available yet"):
        kiln.compile(BUNDLED, target="l40s")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        kiln.compile(BUNDLED, quantization="int3")
    with pytest.raises(FrontendError, match="floating-point dtype"):
        kiln.compile(BUNDLED, dtype="int8")


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "phi3"])
def test_core_aten_programs_import_too(name):
    """After run_decompositions() (core ATen) the importer still gives transformers' logits."""
    from kiln.frontends import import_program
    from kiln.frontends.attention import register_with_transformers
    from kiln.frontends.huggingface import PREFIX, _export
    from kiln.ir import interpret

    model = random_model(name)
    model.set_attn_implementation(register_with_transformers())
    program = _export(model, 64, 64, "cpu").run_decompositions()
    graph = import_program(program, input_dims=[{0: "batch", 1: "seq"}], prefix=PREFIX)
    ids = torch.randint(0, VOCAB, (3, 11))
    assert (interpret(graph, [ids])[0] - _logits(model, ids)).abs().max().item() <= TOLERANCE


def test_constants_lost_by_a_meta_device_export_are_named(tmp_path):
    """Falcon's multi-query heads index with a list (x[..., [-2], :]), a tensor that the
    export on the meta device makes without values: refused with the constant named. The
    same model in memory exports with its values, and imports."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, multi_query=True)).eval()
    with pytest.raises(FrontendError, match=r"constant model.transformer.h.0.self_attention.lifted_tensor_0 .* "
                                            r"meta device"):
        kiln.compile(write_checkpoint(model, tmp_path), dtype="float32", max_seq_len=64)
    ids = torch.randint(0, VOCAB, (3, 17))
    engine = kiln.compile(model, max_seq_len=64)
    assert (engine.logits(ids) - _logits(model, ids)).abs().max().item() <= TOLERANCE
