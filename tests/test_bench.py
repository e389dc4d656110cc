"""``kiln bench`` and the library behind it: the serving run's figures agree with each
other, prompts are fresh every call, what a decode step reads and computes is counted by
hand on the bundled model, and the command prints its JSON."""

import json
import math

import pytest
from hf_models import BUNDLED, random_model
from safetensors import safe_open

import kiln
from kiln import cli
from kiln.runtime import LLMEngine, RuntimeConfig
from kiln.runtime.benchmark import (HardwareLimits, cache_blocks, decode_bytes, hardware_limits,
                                    linear_weight_elements, run_benchmark, step_flops)

LIMITS = HardwareLimits("test", memory_bytes_per_s=1e9, copy_bytes_per_s=1e9, reduce_bytes_per_s=0.5e9,
                        matmul_flops=1e12, matmul_dtype="float32")
INPUT, OUTPUT = 8, 4


@pytest.fixture(scope="module")
def llm_engine(bundled_engine):
    return LLMEngine(bundled_engine, RuntimeConfig(num_blocks=cache_blocks(INPUT, OUTPUT, 3)))


def _checkpoint_elements() -> tuple[int, int]:
    """(all elements, elements of the norms' weights) of the bundled checkpoint."""
    with safe_open(str(BUNDLED / "model.safetensors"), "pt") as f:
        count = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
    return sum(count.values()), sum(n for name, n in count.items() if name.endswith("norm.weight"))


def test_bundled_checkpoint_ties_its_embeddings():
    config = json.loads((BUNDLED / "config.json").read_text())
    with safe_open(str(BUNDLED / "model.safetensors"), "pt") as f:
        assert config["tie_word_embeddings"] and "lm_head.weight" not in f.keys()


def test_decode_bytes_and_flops_by_hand(bundled_engine):
    config = json.loads((BUNDLED / "config.json").read_text())
    elements, norms = _checkpoint_elements()
    rotary = config["head_dim"] // 2  # inv_freq, float32, read by every step
    # the tied table is read once, whole, by the LM head; its gathers add nothing
    assert decode_bytes(bundled_engine) == 4 * (elements + rotary)
    assert linear_weight_elements(bundled_engine) == elements - norms
    assert step_flops(bundled_engine, 10) == 2 * (elements - norms) * 10


def test_decode_bytes_leave_out_an_untied_embedding_table():
    model = random_model("llama")
    engine = kiln.compile(model, max_batch_size=2, max_seq_len=32)
    weights = {name: p.numel() for name, p in model.named_parameters()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    expected = 4 * (sum(weights.values()) - weights["model.embed_tokens.weight"] + head_dim // 2)
    assert decode_bytes(engine) == expected


@pytest.mark.parametrize("concurrency", [1, 3])
def test_run_benchmark_figures_agree(llm_engine, concurrency):
    r = run_benchmark(llm_engine, INPUT, OUTPUT, concurrency, limits=LIMITS)
    assert (r.concurrency, r.output_tokens) == (concurrency, concurrency * OUTPUT)
    assert r.output_tokens_per_s == pytest.approx(r.output_tokens / r.seconds)
    assert r.total_tokens_per_s == pytest.approx(concurrency * (INPUT + OUTPUT) / r.seconds)
    assert 0 < r.ttft_s.p50 <= r.ttft_s.p90 <= r.ttft_s.p99 <= r.seconds
    assert 0 < r.itl_s.p50 <= r.itl_s.p90 <= r.itl_s.p99
    assert r.steps == OUTPUT  # all prompts prefill in the first step, then one decode step per token
    assert r.decode_steps_per_s > 0 and r.decode_tokens_per_s_per_request > 0
    engine = llm_engine.engine
    assert r.decode_bytes_per_s == pytest.approx(decode_bytes(engine) * r.decode_steps_per_s)
    assert r.bandwidth_fraction == pytest.approx(r.decode_bytes_per_s / 1e9)
    processed = concurrency * (INPUT + OUTPUT - 1)
    assert r.tensor_core_fraction == pytest.approx(step_flops(engine, processed) / r.seconds / 1e12)
    assert not llm_engine.has_unfinished()


def test_a_single_new_token_has_no_decode_phase(llm_engine):
    r = run_benchmark(llm_engine, INPUT, 1, 2, limits=LIMITS)
    assert r.output_tokens == 2 and r.itl_s is None and r.decode_steps_per_s is None
    assert r.bandwidth_fraction is None and r.tensor_core_fraction > 0


def test_prompts_are_fresh_every_call(llm_engine, monkeypatch):
    prompts = []
    add_request = llm_engine.add_request

    def recording(prompt, *args, **kwargs):
        prompts.append(tuple(prompt))
        return add_request(prompt, *args, **kwargs)

    monkeypatch.setattr(llm_engine, "add_request", recording)
    for _ in range(2):
        run_benchmark(llm_engine, INPUT, 2, 2, seed=0, full_warmup=True)
    assert len(prompts) == 2 * (1 + 2 + 2) and len(set(prompts)) == len(prompts)
    tokenizer = llm_engine.engine.tokenizer
    special = set(tokenizer.all_special_ids) | set(llm_engine.engine.info.stop_token_ids)
    assert all(len(p) == INPUT and not special & set(p) and max(p) < len(tokenizer) for p in prompts)


def test_hardware_limits_on_the_cpu():
    limits = hardware_limits("cpu", repeat=1)
    assert limits.memory_bytes_per_s == max(limits.copy_bytes_per_s, limits.reduce_bytes_per_s) > 0
    assert limits.matmul_flops > 0 and limits.matmul_dtype == "float32"


def test_kiln_bench_prints_json(capsys):
    code = cli.main(["bench", str(BUNDLED), "--input-len", "8", "--output-len", "4", "--concurrency", "1", "2",
                     "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["target"] == "cpu" and report["max_batch_size"] == 2 and report["max_seq_len"] == 12
    assert report["decode_bytes"] > 0 and report["hardware"]["memory_bytes_per_s"] > 0
    assert [run["concurrency"] for run in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["output_tokens"] == 4 * run["concurrency"]
        assert set(run["ttft_s"]) == set(run["itl_s"]) == {"p50", "p90", "p99"}
        assert 0 < run["bandwidth_fraction"] and 0 < run["tensor_core_fraction"]


def test_kiln_bench_refuses_an_engine_too_small(capsys):
    code = cli.main(["bench", str(BUNDLED), "--input-len", "8", "--output-len", "4", "--concurrency", "1", "2",
                     "--max-seq-len", "10"])
    assert code == 1
    assert "the engine serves 2 sequences of 10 tokens; the runs need 2 of 12" in capsys.readouterr().err


def test_kiln_bench_help_describes_it(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert "--concurrency" in help_text and "time to first token" in help_text
