"""The block manager and the scheduler under hypothesis stateful tests: no block leaks,
none is freed twice or shared by mistake, no request is lost, the budget and the cap
hold, and prefix reuse hands out only blocks that hold the same tokens."""

from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status

BLOCK_SIZE = 4
# a tiny alphabet, so that prompts share prefixes and the cache gets hits
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=14)


def check_blocks(manager: BlockManager, holders: list[Sequence]) -> None:
    """Reference counts equal the number of holders; free blocks are exactly those with
    none; every cached hash points at a block with that hash; a holder's hashed blocks
    hold its tokens."""
    counts = Counter(b for seq in holders for b in seq.block_table)
    for block in manager.blocks:
        assert block.ref_count == counts[block.block_id], block
        assert (block.ref_count == 0) == (block.block_id in manager.free), block
    for digest, block_id in manager.cached.items():
        assert manager.blocks[block_id].hash == digest
    for seq in holders:
        # blocks for every cached token; the block of a just-sampled token comes at the next step
        assert manager.blocks_for(seq.num_cached) <= len(seq.block_table) <= manager.blocks_for(seq.num_tokens)
        for index in range(len(seq.block_hashes)):
            block = manager.blocks[seq.block_table[index]]
            assert block.tokens == tuple(seq.tokens[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=12, block_size=BLOCK_SIZE)
        self.holders: list[Sequence] = []
        self.count = 0

    @rule(tokens=prompts)
    def allocate(self, tokens):
        self.count += 1
        seq = Sequence(str(self.count), None, tokens, SamplingParams())
        if self.manager.can_allocate(seq):
            self.manager.allocate(seq)
            assert seq.num_cached < seq.num_tokens and seq.num_cached % BLOCK_SIZE == 0
            self.holders.append(seq)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def compute(self, data):
        """The model ran the sequence's uncached tokens: commit them."""
        seq = data.draw(st.sampled_from(self.holders))
        seq.num_cached = seq.num_tokens
        self.manager.commit(seq)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self.holders))
        if seq.num_cached < seq.num_tokens:
            return
        seq.tokens.append(token)
        if self.manager.can_append(seq):
            self.manager.append(seq)
        else:
            seq.tokens.pop()

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(self.holders))
        self.holders.remove(seq)
        self.manager.release(seq)
        assert not seq.block_table

    @invariant()
    def consistent(self):
        check_blocks(self.manager, self.holders)


class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, steps run (a stand-in model that appends a token when a sequence
    reaches its end), requests finish or are cancelled; at the end everything drains."""

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
        self.scheduler = Scheduler(self.manager, max_num_seqs=3, max_num_tokens=8)
        self.live: dict[str, Sequence] = {}
        self.done: set[str] = set()
        self.count = 0

    @rule(tokens=prompts, max_tokens=st.integers(1, 12))
    def add(self, tokens, max_tokens):
        self.count += 1
        seq = Sequence(str(self.count), None, tokens, SamplingParams(max_tokens=max_tokens))
        if self.manager.blocks_for(len(tokens) + max_tokens) <= len(self.manager.blocks):
            self.live[seq.request_id] = seq
            self.scheduler.add(seq)

    @rule()
    def step(self):
        batch = self.scheduler.schedule()
        assert sum(item.num_tokens for item in batch) <= self.scheduler.max_num_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        assert len({id(item.seq) for item in batch}) == len(batch)
        for item in batch:
            seq = item.seq
            assert seq.status is Status.RUNNING and item.num_cached == seq.num_cached and item.num_tokens >= 1
            seq.num_cached += item.num_tokens
            self.manager.commit(seq)
            if item.samples:
                seq.tokens.append(seq.num_tokens % 3)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    self._finish(seq, "length")

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data):
        self._finish(data.draw(st.sampled_from(sorted(self.live))), "abort")

    def _finish(self, seq_or_id, reason):
        seq = self.live.pop(seq_or_id) if isinstance(seq_or_id, str) else self.live.pop(seq_or_id.request_id)
        self.scheduler.finish(seq, reason)
        self.done.add(seq.request_id)

    @invariant()
    def consistent(self):
        waiting, running = list(self.scheduler.waiting), self.scheduler.running
        assert not set(map(id, waiting)) & set(map(id, running))
        assert {s.request_id for s in waiting + running} == set(self.live)
        assert all(not s.block_table for s in waiting)
        check_blocks(self.manager, running)

    def teardown(self):
        for _ in range(500):
            if not self.live:
                break
            self.step()
        assert not self.live, f"requests never finished: {sorted(self.live)}"
        assert self.manager.num_free == len(self.manager.blocks)


TestBlockManager = BlockManagerMachine.TestCase
TestScheduler = SchedulerMachine.TestCase
