"""The GPU benchmark scripts' CPU paths. ``bench/moe_layers.py``: its GPU defaults parse,
the bytes a decode step reads are counted by hand, and a tiny Mixtral on kiln's ``cpu``
target beside transformers eager runs end to end and writes its JSON.
``bench/mla_kernels.py``: its bytes and FLOPs by hand, and its cases at toy sizes under
Triton's interpreter."""

import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def moe_layers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling serving.py
    import moe_layers

    return moe_layers


@pytest.fixture
def mla_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import mla_kernels

    return mla_kernels


def test_moe_layers_gpu_defaults(moe_layers, tmp_path):
    args = moe_layers.parse_args(["--out", str(tmp_path / "moe.json")])
    assert (args.device, args.shape, args.layers, args.batch, args.dtype) == ("cuda", "mixtral-8x7b", 4, [1, 64],
                                                                              "bfloat16")


def test_moe_step_bytes_count_the_experts_a_batch_touches(moe_layers):
    model = moe_layers.mixtral_layers("tiny", 1, "cpu", torch.float32)
    config = model.config
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    heads_dim = hidden // config.num_attention_heads
    attention = hidden * hidden * 2 + 2 * hidden * config.num_key_value_heads * heads_dim
    expert = 3 * hidden * inter
    rest = attention + experts * hidden + 2 * hidden + hidden + config.vocab_size * hidden  # router, norms, head
    assert moe_layers.step_bytes(model, 1) == 4 * (rest + 2 * expert)  # 2 of 4 experts
    assert moe_layers.step_bytes(model, 2) == 4 * (rest + experts * (1 - 0.5 ** 2) * expert)


def test_moe_layers_cpu_path_runs_and_writes_its_json(moe_layers, tmp_path):
    out = tmp_path / "moe.json"
    summary = moe_layers.main(["--out", str(out), "--device", "cpu", "--shape", "tiny", "--layers", "2",
                               "--batch", "1", "3", "--input-len", "6", "--output-len", "4"])
    written = json.loads(out.read_text())
    systems = [r["system"] for r in written["results"]]
    assert systems == ["hardware", "model", "kiln", "kiln", "kiln", "transformers eager", "transformers eager",
                       "comparison", "comparison"]
    assert written["results"][2]["ops"]["moe"] == 2  # the routed MLPs became kiln's moe op
    assert [s["batch"] for s in summary["summary"]] == [1, 3]
    for row in summary["summary"]:
        assert row["ratio"] == pytest.approx(row["kiln_output_tokens_per_s"] / row["transformers_output_tokens_per_s"])
        assert 0 < row["kiln_decode_fraction_of_limit"] < 1


def test_mla_step_cost_by_hand(mla_kernels):
    shape = dict(heads=2, nope=4, rope=2, v_dim=3, rank=8)
    # one decode over 3 cached tokens (4 pairs) and a prompt of 2 (3 pairs): 7 pairs, 3 tokens
    nbytes, flops = mla_kernels.step_cost([3, 0], [1, 2], **shape)
    assert nbytes == 2 * (6 * (8 + 2) + 2 * 7 * 8)
    assert flops == 2 * 2 * 7 * (8 + 2 + 8) + 2 * 3 * 2 * 8 * (4 + 3)


def test_mla_kernels_cpu_path_writes_every_case(mla_kernels, tmp_path):
    out = tmp_path / "mla.json"
    rows = mla_kernels.main(["--out", str(out), "--device", "cpu"])
    written = json.loads(out.read_text())
    assert written["shape"] == mla_kernels.SHAPES["tiny"] and written["results"] == rows
    assert [r["case"] for r in rows] == list(mla_kernels.CASES)
    assert all(r["kiln_ms"] > 0 and r["reference_ms"] > 0 and r["bytes"] > 0 for r in rows)
