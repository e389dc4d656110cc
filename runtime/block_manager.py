"""The KV-cache block manager: fixed-size blocks with reference counts, and prefix reuse
by a chained hash per full block.

A block whose count drops to zero stays in the cache with its hash, at the back of the
free list, until a new block is needed and it is the least recently freed: a later
request with the same prefix takes it back instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The chained hash of a full block: its tokens and the hash of the block before it."""
    return hash((parent, tokens))


@dataclass
class Block:
    """A cache block: how many sequences use it, and the hash and tokens of its content
    once it is full (``None`` while it is being written)."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    """Hands out ``num_blocks`` blocks of ``block_size`` tokens to sequences."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently freed first
        self.cached: dict[int, int] = {}  # content hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """The fraction of blocks in use by some sequence."""
        return 1 - len(self.free) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block id, hash) of the cached blocks that start ``seq``, within its
        ``reusable_prefix`` (the tokens whose logits it needs are computed)."""
        found: list[tuple[int, int]] = []
        if not self.prefix_caching:
            return found
        parent = None
        for index in range(seq.reusable_prefix // self.block_size):
            tokens = tuple(seq.tokens[index * self.block_size:(index + 1) * self.block_size])
            digest = block_hash(parent, tokens)
            block_id = self.cached.get(digest)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            found.append((block_id, digest))
            parent = digest
        return found

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether ``seq`` (holding no blocks) can get blocks for all its tokens now."""
        prefix = self._prefix(seq)
        revived = sum(1 for block_id, _ in prefix if block_id in self.free)
        return self.blocks_for(seq.num_tokens) - len(prefix) <= len(self.free) - revived

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks; its
        ``num_cached`` becomes the number of tokens they hold."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free blocks for sequence {seq.request_id}")
        prefix = self._prefix(seq)
        for block_id, digest in prefix:
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(digest)
        seq.num_cached = seq.cached_prompt_tokens = len(prefix) * self.block_size
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._fresh())

    def can_append(self, seq: Sequence) -> bool:
        """Whether ``seq`` can get the blocks its tokens need now (at most one more)."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= len(self.free)

    def append(self, seq: Sequence) -> None:
        """Give ``seq`` the blocks that its tokens need beyond those it holds."""
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            if not self.free:
                raise RuntimeError(f"no free block for sequence {seq.request_id}")
            seq.block_table.append(self._fresh())

    def commit(self, seq: Sequence) -> None:
        """Record the hashes of ``seq``'s blocks that its cached tokens have filled."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.block_size
        while len(seq.block_hashes) < full:
            index = len(seq.block_hashes)
            tokens = tuple(seq.tokens[index * self.block_size:(index + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            digest = block_hash(parent, tokens)
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.tokens = digest, tokens
                self.cached.setdefault(digest, block.block_id)
            seq.block_hashes.append(digest)

    def release(self, seq: Sequence) -> None:
        """Return ``seq``'s blocks (last block first, so that shared prefixes stay longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # unfilled: reuse first
                else:
                    self.free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_cached = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id
