"""The ranks of a parallel engine size their KV caches each after loading its weights and
take the fewest blocks (``agree_num_blocks``): two gloo processes whose devices report
different free memory agree on the smaller plan, and one without room ends both with an
error instead of leaving the other waiting."""

from __future__ import annotations

import pytest
import torch
from gloo_ranks import run_ranks

from kiln.runtime import kv_cache
from kiln.runtime.engine import CacheSpec
from kiln.runtime.kv_cache import CacheLayout
from kiln.runtime.rank_commands import agree_num_blocks

TOTAL = 1_000_000
SPEC = CacheSpec(("k",), ((1, 4),), torch.float32, False)  # 16 bytes a token: 64 a block of 4


def _agree(free: list[int]) -> dict[int, int | str]:
    def plan(rank: int) -> int:
        kv_cache.available_memory = lambda device: (free[rank], TOTAL)  # this rank's device, as the test sets it
        return agree_num_blocks(CacheLayout(0, 4, 1.0, 10**9, 0), SPEC, torch.device("cpu"))

    return run_ranks(plan, len(free))


def test_the_ranks_take_the_fewest_blocks_their_plans_allow():
    # free 640,000 and 64,000 of 1,000,000 bytes, halved for the two ranks sharing the host's memory
    assert _agree([640_000, 64_000]) == {0: 500, 1: 500}


def test_a_rank_without_room_ends_every_rank_with_an_error():
    got = _agree([640_000, 0])
    assert got[1].startswith("MemoryError: no room for a KV cache on cpu")
    assert got[0] == "MemoryError: rank 0: another rank has no room for a KV cache"


def test_a_given_block_count_is_taken_as_it_is():
    assert agree_num_blocks(CacheLayout(7, 4), SPEC, torch.device("cpu")) == 7  # no collective: any process


@pytest.mark.parametrize("sharers, blocks", [(1, 1000), (2, 500)])
def test_ranks_sharing_a_device_plan_for_their_share(monkeypatch, sharers, blocks):
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: (64_000, TOTAL))
    assert kv_cache.plan_num_blocks(SPEC, 4, torch.device("cpu"), 1.0, 10**9, 0, sharers) == blocks
