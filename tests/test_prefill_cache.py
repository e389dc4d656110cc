"""Prefix caching in disaggregated serving, without processes: rank 0's record of the
prefill workers' caches picks the worker that holds a prompt's cached prefix and the
token it starts from; blocks that rank 0 filled by decoding, or that a worker
overwrote, are not counted as held."""

import pytest

from kiln.runtime.block_manager import BlockManager, block_hash
from kiln.runtime.prefill_cache import PrefillPlan, WorkerHoldings
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Sequence

SIZE = 4


def admit(blocks: BlockManager, tokens: list[int], name: str) -> Sequence:
    seq = Sequence(name, None, tokens, SamplingParams())
    blocks.allocate(seq)
    return seq


def finish(blocks: BlockManager, seq: Sequence, decoded: list[int] = ()) -> None:
    """What rank 0 does once the prefill landed: the last prompt token and ``decoded``
    computed, the full blocks committed to the prefix cache, the blocks released."""
    seq.tokens += decoded
    blocks.append(seq)
    seq.num_cached = seq.num_tokens
    blocks.commit(seq)
    blocks.release(seq)


def test_a_fresh_prompt_is_prefilled_whole_and_equal_choices_go_round_robin():
    blocks, holdings = BlockManager(32, SIZE), WorkerHoldings(2, SIZE)
    first, second = admit(blocks, list(range(10)), "a"), admit(blocks, list(range(50, 60)), "b")
    assert holdings.plan(first) == PrefillPlan(0, 0, 0)
    assert holdings.plan(second) == PrefillPlan(1, 0, 0)


def test_a_repeated_prefix_goes_to_the_worker_that_holds_it_from_where_its_blocks_end():
    blocks, holdings = BlockManager(32, SIZE), WorkerHoldings(2, SIZE)
    prompt = list(range(100, 113))  # 13 tokens: the worker writes 12, three full blocks
    seq = admit(blocks, prompt, "a")
    holdings.plan(seq)
    finish(blocks, seq, [7, 8, 9])  # rank 0 fills block 3 by decoding: tokens 12..15
    again = admit(blocks, [*prompt, 7, 8, 9, 1, 2], "b")
    assert again.num_cached == 16  # four cached blocks on rank 0
    # round robin would pick worker 1; worker 0 holds three of the four blocks, not the one rank 0 decoded
    assert holdings.held(0, again) == 3 and holdings.held(1, again) == 0
    assert holdings.plan(again) == PrefillPlan(0, 12, 4)


def sequence(tokens: list[int], table: list[int], cached_blocks: int) -> Sequence:
    """A sequence as rank 0 admits it: ``table`` its blocks, the first ``cached_blocks`` from the prefix cache."""
    seq = Sequence("s", None, tokens, SamplingParams())
    seq.block_table = list(table)
    for index in range(cached_blocks):
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        seq.block_hashes.append(block_hash(parent, tuple(tokens[index * SIZE:(index + 1) * SIZE])))
    seq.num_cached = cached_blocks * SIZE
    return seq


def test_a_block_that_a_worker_overwrites_even_in_part_is_no_longer_held():
    holdings = WorkerHoldings(1, SIZE)
    prompt = list(range(9))
    holdings.plan(sequence(prompt, [0, 1, 2], 0))  # the worker writes tokens 0..7: blocks 0 and 1, full
    probe = sequence(prompt, [0, 1, 2], 2)
    assert holdings.held(0, probe) == 2
    # a prompt sharing block 0 whose tokens 4..5 go to block 1 (rank 0 had evicted it): block 1 is partly rewritten
    assert holdings.plan(sequence([*prompt[:4], 50, 51, 52], [0, 1], 1)) == PrefillPlan(0, 4, 1)
    assert holdings.held(0, probe) == 1


def test_no_worker_is_refused():
    with pytest.raises(ValueError, match="at least one prefill worker"):
        WorkerHoldings(0, SIZE)
