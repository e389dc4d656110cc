"""Profile selection: the CUDA-graph batch sizes are the exact optimum of the cost model
(checked against brute force), and the profiles cover the engine's limits."""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.passes.profiles import EngineLimits, ProfilePlan, Workload, batch_buckets, select_profiles


def _padding(sizes, frequencies, max_batch):
    total = sum(frequencies.get(b, 0) for b in range(1, max_batch + 1))
    weights = {b: frequencies.get(b, 0) / total for b in range(1, max_batch + 1)} if total else \
        {b: 1 / max_batch for b in range(1, max_batch + 1)}
    waste = sum(w * (min(s for s in sizes if s >= b) - b) for b, w in weights.items())
    return waste / sum(w * b for b, w in weights.items())


@given(max_batch=st.integers(2, 9), count=st.integers(2, 5),
       frequencies=st.dictionaries(st.integers(1, 9), st.floats(0.0, 10.0), max_size=6))
def test_batch_sizes_are_the_optimum_of_the_cost_model(max_batch, count, frequencies):
    frequencies = {b: f for b, f in frequencies.items() if b <= max_batch}
    sizes, padding = batch_buckets(frequencies, max_batch, count)
    assert sizes[0] == 1 and sizes[-1] == max_batch and len(sizes) <= count
    assert padding == pytest.approx(_padding(sizes, frequencies, max_batch), abs=1e-9)
    best = min(_padding((1, *middle, max_batch), frequencies, max_batch)
               for k in range(0, min(count, max_batch) - 1)
               for middle in itertools.combinations(range(2, max_batch), k))
    assert padding == pytest.approx(best, abs=1e-9)


def test_a_workload_gets_its_batch_sizes_captured_exactly():
    plan = select_profiles(EngineLimits(64, 2048, 4096), Workload({7: 10, 8: 1, 30: 5, 64: 1}), max_cuda_graphs=6)
    assert plan.cuda_graph_batch_sizes == (1, 7, 8, 30, 64) and plan.expected_padding == 0.0
    assert plan.bucket(7) == 7 and plan.bucket(9) == 30
    with pytest.raises(ValueError, match="exceeds the largest captured size 64"):
        plan.bucket(65)


def test_without_a_workload_sizes_are_spread_evenly():
    plan = select_profiles(EngineLimits(256, 8192, 8192))
    sizes = plan.cuda_graph_batch_sizes
    assert len(sizes) == 24 and sizes[0] == 1 and sizes[-1] == 256
    gaps = [b - a for a, b in zip(sizes[1:], sizes[2:])]
    assert max(gaps) - min(gaps) <= 2 and plan.expected_padding < 0.05


def test_profiles_cover_the_limits_and_serialize():
    limits = EngineLimits(max_batch_size=32, max_seq_len=1000, max_num_tokens=2048, block_size=16)
    plan = select_profiles(limits, Workload(decode_batch_sizes={4: 3, 12: 1}, prompt_lengths={300: 1, 700: 1}))
    decode, prefill = plan.profiles
    assert decode.dims["num_tokens"].max == 32 and decode.dims["num_tokens"].opt == 4
    assert prefill.dims["num_tokens"].max == 2048 and prefill.dims["num_tokens"].opt == 300
    assert all(p.dims["max_blocks"].max == 63 for p in plan.profiles)
    data = json.loads(plan.to_json())
    assert data["cuda_graph_batch_sizes"] == list(plan.cuda_graph_batch_sizes)
    assert isinstance(plan, ProfilePlan)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="must admit a decode of every sequence"):
        EngineLimits(max_batch_size=64, max_seq_len=128, max_num_tokens=32)
    with pytest.raises(ValueError, match="outside 1..8"):
        batch_buckets({9: 1.0}, 8, 4)


def test_compile_records_the_plan_in_the_engine():
    import kiln
    from hf_models import BUNDLED

    engine = kiln.compile(BUNDLED, max_batch_size=16, max_seq_len=256,
                          workload=kiln.Workload(decode_batch_sizes={3: 1.0, 16: 1.0}))
    assert engine.info.profiles.cuda_graph_batch_sizes[:2] == (1, 3)
    assert engine.info.profiles.profiles[1].dims["num_tokens"].max == 256
