"""A paged KV cache with automatic prefix caching, as vLLM v1 keeps it [pure].

The cache is `num_blocks` blocks of `block_size` tokens. A full block is identified by a hash
chain, hash(parent block's hash, the block's token ids), so equal hashes mean equal whole
prefixes. Blocks are shared between sequences and reference-counted. A block nobody references
goes to the end of the free queue but keeps its hash: it can be hit again until it is evicted,
which happens when it reaches the front of the queue and is handed out again (LRU). A sequence
frees its blocks tail first, so its last blocks are evicted before its first ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["ROOT_HASH", "Block", "KVCache", "block_hash"]

ROOT_HASH: Final = 0  # the parent of a sequence's first block


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of a full block after `parent` (hash of ints and tuples: stable across processes)."""
    return hash((parent, tuple(tokens)))


@dataclass(eq=False, slots=True)
class Block:
    """One KV block: who holds it, and the hash of its content once full and cached."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None


class KVCache:
    """Block pool, free queue (LRU) and hash -> block map of cached full blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks nobody references (cached ones included: they can be evicted)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Full blocks that a lookup can hit."""
        return len(self._cached)

    def usage(self) -> float:
        """Fraction (0..1) of blocks referenced by sequences, as vLLM's kv_cache_usage_perc."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, hashes: Iterable[int]) -> list[Block]:
        """The cached blocks of the longest cached prefix of a chain of block hashes."""
        hits: list[Block] = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, num_new: int, hits: Sequence[Block] = ()) -> bool:
        """Whether `num_new` fresh blocks fit once `hits` (unreferenced ones leave the queue) are taken."""
        reclaimed = sum(1 for b in hits if b.ref_count == 0)
        return num_new + reclaimed <= len(self._free)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Reference hit blocks (an unreferenced one leaves the free queue, so it is not evicted)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def allocate(self, n: int) -> list[Block]:
        """`n` blocks from the front of the free queue, evicting their cached content."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks: {len(self._free)} free")
        out: list[Block] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.hash is not None:
                if self._cached.get(block.hash) is block:
                    del self._cached[block.hash]
                    self.evictions += 1
                block.hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference to each block, tail first; unreferenced ones join the free queue."""
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None

    def cache(self, block: Block, h: int) -> None:
        """Make a just-filled block findable by its hash (the first block with a hash keeps it)."""
        if block.hash is None and h not in self._cached:
            block.hash = h
            self._cached[h] = block
