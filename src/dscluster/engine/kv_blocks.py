"""Rank 0 only: the accounting of the key/value cache's pool of blocks, and the prefix cache.

Every rank holds a pool of `num_blocks` blocks of `block_size` token positions each, for every
layer (engine/kv_cache.py); this class decides what lives where, and the scheduler sends its
decisions in each step's message so every rank applies the same ones (engine/protocol.py).

Each running request holds one *run*: consecutive blocks [start, start + length). Runs, not
scattered blocks, because attention then reads each request's keys and values as one contiguous
view of the pool at the speed of a dense cache (measured on this CPU: gathering scattered blocks
into a dense copy every step costs 2.5-4x the attention itself; see docs/architecture.md). What
paging gives elsewhere comes from the same accounting:

- memory: a request holds only the blocks its own tokens need (plus, while the pool has room,
  spare blocks at the end of its run for the tokens it may still generate; taken back first
  when another request needs room), not the longest request's length;
- growth: a run that must grow extends in place when the next blocks are free, else moves to a
  free stretch (its blocks are copied once on every rank); when no stretch is long enough, the
  runs are packed towards the start of the pool (`compact`), and only then is a request
  preempted (the scheduler's decision);
- prefix caching: a full block is keyed by a hash chain (its parent block's key and its own
  tokens), as vLLM keys them. A block that holds a key keeps it while its request runs and after
  it leaves (a freed block keeps its contents until it is reused; the least recently freed are
  reused first). A new request finds its longest cached prefix and its run gets those blocks'
  contents by one copy on every rank, or by no copy at all when the run can start on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BLOCK_SIZE = 16      # tokens per block, as vLLM's default (docs/architecture.md: why)
ROOT_KEY = 0x5D5C    # the parent key of every request's first block


def block_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a full block: a hash of its parent's key and its own tokens. Hashes of tuples of
    ints are deterministic in CPython (no per-process salt), and a hit is checked against the
    block's stored tokens as well (`BlockPool.lookup`), so a collision cannot serve wrong values."""
    return hash((parent, tuple(tokens)))


@dataclass
class Run:
    start: int
    length: int


@dataclass
class Placement:
    """Where a joining request's run goes, and which cached blocks are copied into its start
    (source block, destination block, count), in order."""

    start: int
    length: int
    cached_blocks: int = 0
    copies: list[tuple[int, int, int]] = field(default_factory=list)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the key/value cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.owner = np.full(num_blocks, -1, dtype=np.int64)   # request holding the block, -1: free
        self.freed_at = np.zeros(num_blocks, dtype=np.int64)   # free blocks with a key: when freed (LRU)
        self.runs: dict[int, Run] = {}
        self._key_of: dict[int, int] = {}                      # block -> key of its contents
        self._block_of: dict[int, int] = {}                    # key -> block
        self._tokens_of: dict[int, tuple[int, ...]] = {}       # block -> its tokens (to check a hit)
        self._parent_of: dict[int, int] = {}                   # block -> its parent's key
        self._clock = 1

    # -- prefix cache ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached prefix of a request whose full blocks have
        `keys` (in order) and whose tokens are `tokens`."""
        if not self.prefix_caching:
            return []
        found, parent, size = [], ROOT_KEY, self.block_size
        for i, key in enumerate(keys):
            block = self._block_of.get(key)
            if block is None or self._parent_of[block] != parent or \
                    self._tokens_of[block] != tuple(tokens[i * size:(i + 1) * size]):
                break
            found.append(block)
            parent = key
        return found

    def register(self, block: int, key: int, parent: int, tokens: Sequence[int]) -> None:
        """`block` (held by a running request) is now full and computed: its contents are `key`."""
        if not self.prefix_caching or key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key
        self._tokens_of[block] = tuple(tokens)
        self._parent_of[block] = parent

    def cached(self, key: int) -> bool:
        return key in self._block_of

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            self._block_of.pop(key, None)
            self._tokens_of.pop(block, None)
            self._parent_of.pop(block, None)
        self.freed_at[block] = 0

    def _move_key(self, old: int, new: int) -> None:
        key = self._key_of.pop(old, None)
        if key is None:
            return
        self._block_of[key] = new
        self._key_of[new] = key
        self._tokens_of[new] = self._tokens_of.pop(old)
        self._parent_of[new] = self._parent_of.pop(old)

    # -- runs ------------------------------------------------------------------------------
    def free_blocks(self) -> int:
        return int((self.owner < 0).sum())

    def held_blocks(self) -> int:
        return self.num_blocks - self.free_blocks()

    def place(self, request_id: int, want: int, minimum: int, hits: Sequence[int] = ()) -> Placement | None:
        """A run for a joining request: `want` blocks if a free stretch is that long, else
        `minimum`; its first blocks get the contents of the cached blocks `hits`. None if no free
        stretch of `minimum` blocks exists (the caller may free or pack blocks and ask again)."""
        if request_id in self.runs:
            raise ValueError(f"request {request_id} already holds blocks")
        hits = list(hits)
        start = self._zero_copy_start(hits, minimum)
        if start is not None:
            length = self._free_run_length(start, want)
            self._take(request_id, start, length, keep_keys=hits)
            return Placement(start, length, len(hits))
        pinned = np.zeros(self.num_blocks, dtype=bool)
        pinned[hits] = True
        for size in dict.fromkeys((want, minimum)):
            start = self.find(size, pinned)
            if start is not None:
                self._take(request_id, start, size)
                copies = _segments(hits, start)
                for i, block in enumerate(hits):
                    if self.owner[block] < 0:    # a freed block's contents now live in the run
                        self._move_key(block, start + i)
                return Placement(start, size, len(hits), copies)
        if hits:
            # The cached blocks sit where no free stretch long enough fits beside them (say, at the
            # end of the pool): the prefix is computed again rather than the request never joining.
            return self.place(request_id, want, minimum)
        return None

    def _zero_copy_start(self, hits: list[int], minimum: int) -> int | None:
        """The first hit block, if the hits are consecutive free blocks followed by enough free
        blocks for `minimum`: the run starts there and nothing is copied."""
        if not hits or any(b != hits[0] + i for i, b in enumerate(hits)):
            return None
        if self._free_run_length(hits[0], minimum) < minimum:
            return None
        return hits[0]

    def _free_run_length(self, start: int, most: int) -> int:
        end = min(self.num_blocks, start + most)
        taken = np.flatnonzero(self.owner[start:end] >= 0)
        return int(taken[0]) if taken.size else end - start

    def find(self, size: int, pinned: np.ndarray | None = None) -> int | None:
        """The start of `size` free blocks: among free stretches long enough, the one whose blocks'
        cached contents were freed longest ago (blocks without contents first), then the shortest
        stretch (to keep long ones for long requests)."""
        free = self.owner < 0
        if pinned is not None:
            free &= ~pinned
        edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        best, best_cost = None, None
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e - s < size:
                continue
            for start in (s, e - size) if e - s > size else (s,):
                cost = (int(self.freed_at[start:start + size].max()), e - s)
                if best_cost is None or cost < best_cost:
                    best, best_cost = start, cost
        return best

    def _take(self, request_id: int, start: int, length: int, keep_keys: Sequence[int] = ()) -> None:
        keep = set(keep_keys)
        for block in range(start, start + length):
            if block not in keep:
                self._forget(block)
            self.freed_at[block] = 0
        self.owner[start:start + length] = request_id
        self.runs[request_id] = Run(start, length)

    def grow(self, request_id: int, length: int) -> tuple[int, int] | None:
        """Make the request's run at least `length` blocks: in place if the blocks after it are
        free, else a new free stretch (the caller copies the used blocks). Returns (new start,
        new length), or None when no free stretch is long enough."""
        run = self.runs[request_id]
        if run.length >= length:
            return run.start, run.length
        end = run.start + run.length
        if self._free_run_length(end, length - run.length) >= length - run.length:
            self._take_more(request_id, end, length - run.length)
            run.length = length
            return run.start, run.length
        target = max(length, 2 * run.length)
        for size in dict.fromkeys((target, length)):
            start = self.find(size)
            if start is not None:
                self._relocate(request_id, start, size)
                return start, size
        return None

    def _take_more(self, request_id: int, start: int, count: int) -> None:
        for block in range(start, start + count):
            self._forget(block)
        self.owner[start:start + count] = request_id

    def _relocate(self, request_id: int, start: int, length: int) -> None:
        """Move a run (its contents are copied by every rank); its keys move with it."""
        run = self.runs[request_id]
        old = run.start
        self.owner[old:old + run.length] = -1
        for block in range(start, start + length):
            if not (old <= block < old + run.length):
                self._forget(block)
        moved = min(run.length, length)
        # Keys follow the contents; go in the copy's safe order when the two ranges overlap.
        order = range(moved) if start < old else range(moved - 1, -1, -1)
        for i in order:
            self._move_key(old + i, start + i)
        for block in range(old, old + run.length):
            if not (start <= block < start + length):
                self._forget(block)
        self.owner[start:start + length] = request_id
        run.start, run.length = start, length

    def trim(self, request_id: int, length: int) -> None:
        """Give back the blocks of a run past its first `length` (spare blocks nothing was written to)."""
        run = self.runs[request_id]
        if length < run.length:
            self.owner[run.start + length:run.start + run.length] = -1
            for block in range(run.start + length, run.start + run.length):
                self._forget(block)
            run.length = length

    def compact(self, last: int | None = None) -> list[tuple[int, int]]:
        """Pack the runs so that every free block is in one stretch; returns (request id, new
        start) for each run that moved, in the order the copies must be made. Without `last`, every
        run moves towards the start of the pool. With `last`, the runs before it move towards the
        start, those after it towards the end, then `last` moves next to the first group: the free
        stretch follows it, so it can grow in place (and no run is ever copied over blocks not yet
        copied away). Free blocks that get overwritten lose their cached contents."""
        runs = sorted(self.runs.items(), key=lambda item: item[1].start)
        pivot = self.runs.get(last) if last is not None else None
        moves: list[tuple[int, int]] = []

        def move(request_id: int, start: int) -> None:
            if self.runs[request_id].start != start:
                self._relocate(request_id, start, self.runs[request_id].length)
                moves.append((request_id, start))

        cursor = 0
        for request_id, run in runs:
            if pivot is None or run.start < pivot.start:
                move(request_id, cursor)
                cursor += run.length
        end = self.num_blocks
        for request_id, run in reversed(runs):
            if pivot is not None and run.start > pivot.start:
                end -= run.length
                move(request_id, end)
        if pivot is not None:
            move(last, cursor)
        return moves

    def free(self, request_id: int) -> None:
        """The request left: its blocks are free; those with a key keep their contents until reused."""
        run = self.runs.pop(request_id, None)
        if run is None:
            return
        blocks = range(run.start, run.start + run.length)
        self.owner[run.start:run.start + run.length] = -1
        self._clock += 1
        for block in blocks:
            if block in self._key_of:
                self.freed_at[block] = self._clock
            else:
                self.freed_at[block] = 0

    def reset(self) -> None:
        """Every rank dropped its rows (a failed step): nothing is held and nothing is trusted."""
        self.owner[:] = -1
        self.freed_at[:] = 0
        self.runs.clear()
        self._key_of.clear()
        self._block_of.clear()
        self._tokens_of.clear()
        self._parent_of.clear()


def _segments(hits: Sequence[int], start: int) -> list[tuple[int, int, int]]:
    """Copies (source, destination, count) of hit blocks into a run at `start`, consecutive
    blocks merged."""
    copies: list[tuple[int, int, int]] = []
    for i, block in enumerate(hits):
        if copies and copies[-1][0] + copies[-1][2] == block:
            src, dst, n = copies[-1]
            copies[-1] = (src, dst, n + 1)
        else:
            copies.append((block, start + i, 1))
    return copies
