"""The scheduler: in-flight batching under a token budget per step.

Each step, running sequences go first, oldest first: a decode takes one token, an
unfinished prefill its next chunk. Waiting sequences then join, oldest first, with their
prompt (or its first chunk) while the budget and the cap on running sequences allow; a
sequence that cannot get its blocks stops the queue, so nobody overtakes it and nobody
starves. When a running sequence needs a block and none is free, the newest running
sequence is preempted: it gives its blocks back and waits at the head of the queue, to
be recomputed from its tokens (with prefix caching, mostly from cached blocks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass(frozen=True)
class Scheduled:
    """One sequence's part of a step: ``num_tokens`` of its tokens from ``num_cached`` on."""

    seq: Sequence
    num_cached: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether the step reaches the sequence's last token, so that it samples one."""
        return self.num_cached + self.num_tokens == self.seq.num_tokens

    @property
    def logit_rows(self) -> int:
        """How many of the step's last tokens need logits: the prompt positions whose
        log-probabilities the sequence still needs, then the last token if it samples.
        (They are always the last ones: prompt positions that need logits are never cached,
        and a sequence has output tokens only once its prompt's logits are all taken.)"""
        start = self.seq.prompt_logits_from
        end = self.num_cached + self.num_tokens
        scored = 0 if start is None else max(0, min(end, len(self.seq.prompt_ids) - 1) - max(start, self.num_cached))
        return scored + self.samples


class Scheduler:
    """Decides which tokens of which sequences each step runs."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_tokens: int):
        if max_num_seqs < 1 or max_num_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_tokens must be positive, got {max_num_seqs}, "
                             f"{max_num_tokens}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of arrival
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it joins at the next step that has room."""
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        """The sequences and tokens of the next step."""
        budget = self.max_num_tokens
        batch: list[Scheduled] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_uncached, budget)
            if not self._make_room(seq, index):
                continue  # seq itself was preempted; the next one moved into its place
            batch.append(Scheduled(seq, seq.num_cached, count))
            budget -= count
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            count = min(seq.num_uncached, budget)
            batch.append(Scheduled(seq, seq.num_cached, count))
            budget -= count
        return batch

    def _make_room(self, seq: Sequence, index: int) -> bool:
        """Get ``seq`` the blocks it needs, preempting the newest running sequences;
        whether ``seq`` is still running."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (finished, stopped or cancelled) and free its blocks."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
