"""The sorted-vocabulary index: every "tokens whose bytes start with u" set as one range.

Sort the byte-bearing tokens by their bytes. For any byte string `u`, the tokens whose bytes
start with `u` are then a contiguous range `[lo, hi)` of sorted positions, so the teacher mass
`M_k(u)` is `C_k[hi] - C_k[lo]` with `C_k` the running sum of `p_k` in sorted order.

The prefixes that can occur (every prefix of every token) form a trie; we store it flat, one row
a node, numbered depth by depth and, within a depth, in sorted order. The children of a node are
then consecutive node ids in byte order, and their ranges tile the parent's range (after the one
token equal to the parent's prefix, if any). The whole table is built with array operations: a
131k vocabulary takes about a second (`tools/bench_vocab.py` prints it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class SortedVocabIndex:
    """Trie over the sorted vocabulary.

    Attributes (numpy arrays):
      perm        [S]  token ids sorted by bytes (S = tokens that have bytes)
      node_lo/hi  [Nn] range of sorted positions whose bytes start with the node's prefix
      node_depth  [Nn] prefix length; node 0 is the root (empty prefix, the whole range)
      node_byte   [Nn] last byte of the prefix (-1 for the root)
      child_start [Nn] first child's node id; child_count [Nn] how many children
      edge_key    [Nn-1] parent * 256 + byte for nodes 1.., ascending: the child lookup table
    """

    def __init__(self, token_bytes: Sequence[bytes | None]):
        ids = [i for i, b in enumerate(token_bytes) if b]
        ids.sort(key=lambda i: token_bytes[i])
        self.vocab_size = len(token_bytes)
        self.perm = np.asarray(ids, dtype=np.int64)
        sorted_bytes = [token_bytes[i] for i in ids]
        self.sorted_bytes = sorted_bytes
        size = len(sorted_bytes)
        lengths = np.fromiter((len(b) for b in sorted_bytes), dtype=np.int64, count=size)
        depth_max = int(lengths.max()) if size else 0
        # Padded byte matrix (-1 past the end) in sorted order.
        mat = np.full((size, depth_max), -1, dtype=np.int16)
        flat = np.frombuffer(b"".join(sorted_bytes), dtype=np.uint8)
        rows = np.repeat(np.arange(size), lengths)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        mat[rows, cols] = flat
        # lcp[i]: common prefix length of sorted rows i-1 and i. Two rows can hold the same bytes
        # (SentencePiece's <0x41> and "A"); they share the whole row, so their lcp is its length.
        lcp = np.zeros(size, dtype=np.int64)
        if size > 1:
            differ = mat[1:] != mat[:-1]
            lcp[1:] = np.where(differ.any(axis=1), np.argmax(differ, axis=1), lengths[1:])
        self.lengths = lengths

        lo_parts, hi_parts, depth_parts, byte_parts, parent_parts = [np.array([0])], [np.array([size])], \
            [np.array([0])], [np.array([-1])], [np.array([-1])]
        prev_starts = np.array([0], dtype=np.int64)  # depth-0 node starts (the root)
        prev_first_id = 0
        next_id = 1
        for d in range(1, depth_max + 1):
            # A depth-d node starts at row i when the row is long enough and its first d bytes
            # differ from the previous row's; it ends where the first d bytes change again.
            changes = np.flatnonzero(lcp < d)  # rows where the d-byte prefix may change
            starts = changes[lengths[changes] >= d]
            if starts.size == 0:
                break
            ends_at = np.searchsorted(changes, starts, side="right")
            hi = np.where(ends_at < changes.size, changes[np.minimum(ends_at, changes.size - 1)], size)
            parent = prev_first_id + np.searchsorted(prev_starts, starts, side="right") - 1
            lo_parts.append(starts)
            hi_parts.append(hi)
            depth_parts.append(np.full(starts.size, d))
            byte_parts.append(mat[starts, d - 1].astype(np.int64))
            parent_parts.append(parent)
            prev_starts, prev_first_id = starts, next_id
            next_id += starts.size
        self.node_lo = np.concatenate(lo_parts)
        self.node_hi = np.concatenate(hi_parts)
        self.node_depth = np.concatenate(depth_parts)
        self.node_byte = np.concatenate(byte_parts)
        parent = np.concatenate(parent_parts)
        n_nodes = self.node_lo.size
        self.edge_key = parent[1:] * 256 + self.node_byte[1:]
        counts = np.bincount(parent[1:], minlength=n_nodes) if n_nodes > 1 else np.zeros(1, np.int64)
        self.child_count = counts
        first_child = np.full(n_nodes, n_nodes, dtype=np.int64)
        # children of a node are consecutive ids; the first is the smallest id with that parent
        np.minimum.at(first_child, parent[1:], np.arange(1, n_nodes))
        self.child_start = np.where(counts > 0, first_child, 0)
        # Token equal to the node's prefix, if any (it sorts first in the node's range).
        lo_len = np.where(self.node_lo < size, lengths[np.minimum(self.node_lo, max(size - 1, 0))], -1) \
            if size else np.array([-1])
        self.node_exact = np.where(lo_len == self.node_depth, self.node_lo, -1)
        self.node_exact[0] = -1
        self._torch_cache: dict = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_nodes(self) -> int:
        return int(self.node_lo.size)

    def child(self, node: np.ndarray | int, byte: np.ndarray | int) -> np.ndarray:
        """Child node of `node` along `byte` (vectorised); -1 where there is none."""
        node = np.asarray(node, dtype=np.int64)
        byte = np.asarray(byte, dtype=np.int64)
        key = np.where((node >= 0) & (byte >= 0) & (byte < 256), node * 256 + byte, -1)
        pos = np.searchsorted(self.edge_key, key)
        pos_c = np.minimum(pos, max(self.edge_key.size - 1, 0))
        found = (key >= 0) & (pos < self.edge_key.size) & (self.edge_key[pos_c] == key) \
            if self.edge_key.size else np.zeros_like(node, dtype=bool)
        return np.where(found, pos_c + 1, -1)

    def node_of(self, u: bytes) -> int:
        """Trie node of the prefix `u`, or -1 when no token starts with `u`."""
        node = 0
        for b in u:
            node = int(self.child(node, b))
            if node < 0:
                return -1
        return node

    def range(self, u: bytes) -> tuple[int, int]:
        """`[lo, hi)`: sorted positions whose bytes start with `u` (empty range when none)."""
        node = self.node_of(u)
        if node < 0:
            return (0, 0)
        return int(self.node_lo[node]), int(self.node_hi[node])

    def walk(self, data: bytes, starts: Sequence[int], max_end: int | None = None):
        """Follow the trie along `data` from every start offset at once.

        Returns (start_index, end, node) arrays: for each start `s = starts[start_index]` and each
        `end >= s` such that some token starts with `data[s:end]`, the node of that prefix
        (`end == s` gives the root). `max_end` caps the ends (defaults to len(data)).
        """
        text = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        limit = len(data) if max_end is None else min(int(max_end), len(data))
        starts = np.asarray(starts, dtype=np.int64)
        out_k, out_end, out_node = [], [], []
        active = np.arange(starts.size)
        node = np.zeros(starts.size, dtype=np.int64)
        depth = 0
        while active.size:
            out_k.append(active)
            out_end.append(starts[active] + depth)
            out_node.append(node)
            pos = starts[active] + depth
            ok = pos < limit
            active, node, pos = active[ok], node[ok], pos[ok]
            node = self.child(node, text[pos])
            keep = node >= 0
            active, node = active[keep], node[keep]
            depth += 1
        if not out_k:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return np.concatenate(out_k), np.concatenate(out_end), np.concatenate(out_node)

    def torch_tables(self, device):
        """The node tables as torch tensors on `device` (cached per device)."""
        import torch

        key = str(device)
        if key not in self._torch_cache:
            self._torch_cache[key] = {
                name: torch.as_tensor(getattr(self, name), device=device)
                for name in ("perm", "node_lo", "node_hi", "node_byte", "child_start", "child_count")
            }
        return self._torch_cache[key]
