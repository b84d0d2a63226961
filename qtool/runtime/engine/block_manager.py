"""The KV cache's bookkeeping: fixed-size blocks handed to sequences through block tables, and prefix caching
(full blocks keyed by a chain hash of their tokens and everything before them, shared by refcount, evicted LRU).
With a sliding window on every layer, a sequence's blocks wholly before the window of its next token are released
(their table entries become RELEASED), so its cache stays bounded however long it runs."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from qtool.runtime.engine.sequence import Sequence


# A block table entry whose block was released: wholly before the window of every query the sequence will still
# make. Attention never reads it (attention.paged_attention starts at the window).
RELEASED = -1


def cache_window(layer_windows: list[int | None]) -> int | None:
    """The window that bounds a sequence's cache: the widest layer window when every layer has one, else None. A
    model mixing full-attention layers with windowed ones (Qwen2's max_window_layers, Gemma-like patterns) reads
    every position in some layer, so it keeps all its blocks."""
    if not layer_windows or any(window is None for window in layer_windows):
        return None
    return max(layer_windows)


def chain_hash(previous: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    """The key of a full block: its tokens and, through `previous` (the key of the block before it), every token
    before them; equal keys mean equal prefixes (matches are also checked token by token)."""
    return hash((previous, tuple(tokens)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # chain hash, set once the block is full and its K/V are written
    token_ids: tuple[int, ...] = ()  # the tokens behind `key`, to rule out hash collisions


@dataclass
class CacheStats:
    prefix_hit_requests: int = 0  # admissions that reused at least one cached block
    prefix_hit_blocks: int = 0
    saved_prompt_tokens: int = 0  # tokens whose K/V came from the cache instead of a forward pass
    evictions: int = 0  # cached blocks recycled for new content
    blocks_used: int = 0  # referenced by a sequence
    blocks_free: int = 0  # free or cached-but-unreferenced (reclaimable)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    sliding_window: int | None = None  # cache_window(): None keeps every block of a sequence
    blocks: list[Block] = field(init=False)
    _empty: deque[int] = field(init=False)  # unreferenced, holding nothing worth keeping
    _cached_lru: OrderedDict[int, None] = field(init=False)  # unreferenced but keyed: oldest first, evicted first
    _by_key: dict[int, int] = field(init=False)  # chain hash -> block id
    _stats: CacheStats = field(init=False)
    # seq id -> (its leading RELEASED entries, the chain hash of the last of them): where key chaining resumes
    _released: dict[int, tuple[int, int | None]] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._empty = deque(range(self.num_blocks))
        self._cached_lru = OrderedDict()
        self._by_key = {}
        self._stats = CacheStats()
        self._released = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: empty ones, then cached ones nobody references (evicted on demand)."""
        return len(self._empty) + len(self._cached_lru)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def most_blocks(self, num_tokens: int, chunk_tokens: int) -> int:
        """The most blocks a sequence of up to num_tokens tokens holds at once, computing at most chunk_tokens per
        step: all of them, or with a sliding window those from its window's start to its chunk's end."""
        if self.sliding_window is None:
            return self.blocks_for(num_tokens)
        return min(self.blocks_for(num_tokens), (self.sliding_window + chunk_tokens - 2) // self.block_size + 2)

    def releasable(self, num_cached_tokens: int) -> int:
        """How many leading blocks no query from position num_cached_tokens on reads (0 without a window)."""
        if self.sliding_window is None:
            return 0
        return max(0, num_cached_tokens - self.sliding_window + 1) // self.block_size

    def stats(self) -> CacheStats:
        stats = CacheStats(**self._stats.to_dict())
        stats.blocks_free = self.num_free_blocks
        stats.blocks_used = self.num_blocks - stats.blocks_free
        return stats

    # -- prefix caching --------------------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks holding the longest prefix of seq's tokens. The block holding the last token
        is never reused: its logits are needed, so at least one token is computed, and a shared block is never
        written."""
        tokens = seq.token_ids
        matched: list[int] = []
        key = None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            key = chain_hash(key, chunk)
            block_id = self._by_key.get(key)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            matched.append(block_id)
        return matched

    def can_admit(self, matched: list[int], num_tokens: int) -> bool:
        """Whether a sequence reusing `matched` can get blocks for its first `num_tokens` tokens."""
        kept = matched[self.releasable(len(matched) * self.block_size):]  # admit() takes no others
        reclaimed = sum(1 for b in kept if self.blocks[b].ref_count == 0)  # matched blocks leave the free pool
        needed = max(0, self.blocks_for(num_tokens) - len(matched))
        return needed <= self.num_free_blocks - reclaimed

    def admit(self, seq: Sequence, matched: list[int]) -> None:
        """Give seq the matched cached blocks (shared; with a window, those before it as RELEASED entries, left
        cached for others) and mark their tokens as cached."""
        assert not seq.block_table, "a sequence is admitted with an empty block table"
        released = self.releasable(len(matched) * self.block_size)
        if released:
            seq.block_table.extend([RELEASED] * released)
            self._released[seq.seq_id] = (released, self.blocks[matched[released - 1]].key)
        for block_id in matched[released:]:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._cached_lru.pop(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = len(matched) * self.block_size
        if matched:
            self._stats.prefix_hit_requests += 1
            self._stats.prefix_hit_blocks += len(matched)
            self._stats.saved_prompt_tokens += seq.num_cached_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key seq's blocks that are now full and written, so later requests can reuse them. A block whose content
        is already cached elsewhere (two requests computed it at once) stays unkeyed and is recycled when freed."""
        start, key = self._released.get(seq.seq_id, (0, None))
        for index in range(start, seq.num_cached_tokens // self.block_size):
            block = self.blocks[seq.block_table[index]]
            if block.key is not None:  # a keyed block's key is the chain hash up to it
                key = block.key
                continue
            chunk = tuple(seq.token_slice(index * self.block_size, (index + 1) * self.block_size))
            key = chain_hash(key, chunk)
            if key not in self._by_key:
                block.key, block.token_ids = key, chunk
                self._by_key[key] = block.block_id

    # -- allocation ------------------------------------------------------------------------------------------------

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's block table can be made to cover its first `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks to seq's table until it covers its first `num_tokens` tokens."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take_block())

    def release_out_of_window(self, seq: Sequence) -> int:
        """With a sliding window: release seq's blocks wholly before the window of its next token (no later query
        reads them), keeping the chain hash for the blocks still to be keyed. A released block nobody else
        references stays cached (if keyed) for requests sharing the prefix. Returns how many were released."""
        start, key = self._released.get(seq.seq_id, (0, None))
        stop = min(self.releasable(seq.num_cached_tokens), len(seq.block_table))
        for index in range(start, stop):
            block = self.blocks[seq.block_table[index]]
            # full and written (before the cached count), so keyed unless its content was cached elsewhere first
            key = block.key if block.key is not None else chain_hash(
                key, seq.token_slice(index * self.block_size, (index + 1) * self.block_size))
            self._unref(block)
            seq.block_table[index] = RELEASED
        if stop > start:
            self._released[seq.seq_id] = (stop, key)
        return max(0, stop - start)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. Keyed blocks stay cached until a free block is needed; the table is released
        from its end, so a sequence's tail is evicted before its (more shareable) head."""
        for block_id in reversed(seq.block_table):
            if block_id != RELEASED:
                self._unref(self.blocks[block_id])
        seq.block_table = []
        seq.num_cached_tokens = 0
        self._released.pop(seq.seq_id, None)

    def _unref(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.key is not None:
                self._cached_lru[block.block_id] = None
            else:
                self._empty.append(block.block_id)

    def release_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Drop seq's blocks past those covering its first `num_tokens` tokens (room grown for rejected drafts:
        never full, never keyed)."""
        while len(seq.block_table) > self.blocks_for(num_tokens):
            block_id = seq.block_table.pop()
            if block_id != RELEASED:
                self._unref(self.blocks[block_id])

    def _take_block(self) -> int:
        if self._empty:
            block_id = self._empty.popleft()
        elif self._cached_lru:
            block_id, _ = self._cached_lru.popitem(last=False)
            evicted = self.blocks[block_id]
            del self._by_key[evicted.key]
            evicted.key, evicted.token_ids = None, ()
            self._stats.evictions += 1
        else:
            raise RuntimeError("no free KV cache block: the scheduler must check can_grow first")
        self.blocks[block_id].ref_count = 1
        return block_id
