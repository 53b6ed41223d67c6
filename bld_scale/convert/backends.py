"""Which implementation computes the conversion's sums: torch or Triton kernels.

Backends (recipe key `distill.conversion_backend`): "torch" (`running_sums`: `RunningSums`, the
edge list of `split_edges`, `scatter_edges`; any device), "triton" (`triton_sums`: CUDA tensors,
or CPU tensors under the Triton interpreter `TRITON_INTERPRET=1`, for tests) and "auto" (triton
for a CUDA tensor when triton imports, torch otherwise). Every mode's splits go through
`log_add_splits` (one-pass, exact's extra contexts, the sequence-parallel shards); both backends
give the same numbers to float64 rounding.

The triton path (`TritonSplits`): the splits are grouped on the host by chunk of teacher rows (the
running sums that fit the memory budget) and, within a chunk, by output byte row; per chunk one
kernel writes the running sums and one log-adds every edge into the rows it feeds (one program per
row: `triton_sums`). The edges are never materialised. Small masses are refined as in torch: the
rows whose splits `masses_too_small` flags on the totals after the kernels are restored and redone
by the torch code (`split_edges`, `scatter_edges`), which realistic teachers never need. Each
backend also computes the rows' log-normalisers when the conversion reads raw logits
(`log_normaliser_function`).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from bld_scale.convert.running_sums import (RunningSums, chunk_rows, log_normaliser, masses_too_small, scatter_edges,
                                            split_edges)

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown conversion backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton": what `backend` runs for tensors on `device` (refuses what cannot run)."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "torch":
        return backend
    if not _triton_importable():
        raise RuntimeError("conversion backend 'triton' needs the triton package: install it (it comes "
                           "with torch's CUDA builds; `pip install triton` elsewhere), or use backend "
                           "'torch' or 'auto'")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"conversion backend 'triton' runs on CUDA tensors; these are on {device}. Set "
                           "TRITON_INTERPRET=1 before triton is first imported to run the kernels on "
                           "CPU (slow, for tests), or use backend 'torch' or 'auto'")
    return backend


def log_normaliser_function(backend: str, device: torch.device):
    """`[R, V]` logits -> float32 `[R]` logsumexp, as `backend` computes it on `device`."""
    if resolve_backend(backend, device) == "torch":
        return log_normaliser
    from bld_scale.convert.triton_sums import triton_log_normaliser
    return triton_log_normaliser


def log_add_splits(acc: torch.Tensor, rows: torch.Tensor, split_row: np.ndarray, split_end: np.ndarray,
                   split_node: np.ndarray, log_weight: torch.Tensor, index, memory_bytes: int, *,
                   backend: str = "torch", log_normaliser: torch.Tensor | None = None,
                   totals_with: torch.Tensor | None = None) -> torch.Tensor:
    """`acc [rows_out, 257]` (float64) with every edge of the splits log-added and their too-small
    masses re-summed directly (`running_sums.scatter_edges`); returns the result.

    Split i: teacher row `split_row[i]` of `rows`, weight `log_weight[split_row[i]]`, prefix
    `split_node[i]` of the trie `index`, output row `split_end[i]` of `acc`. `memory_bytes`: the
    logits' size, which bounds the running sums' memory; `log_normaliser`: when `rows` are raw
    logits; `totals_with`: other rows that add to the same outputs (judged together).
    """
    if resolve_backend(backend, acc.device) == "torch":
        edges = split_edges(rows, split_row, split_end, split_node, log_weight, index, memory_bytes,
                            running_sums=RunningSums, log_normaliser=log_normaliser)
        return scatter_edges(acc, edges, log_weight, rows, index.torch_tables(acc.device)["perm"],
                             totals_with=totals_with, log_normaliser=log_normaliser)
    splits = TritonSplits(rows, split_row, split_end, split_node, log_weight, index, memory_bytes, log_normaliser)
    if splits.empty:
        return acc
    before = acc.clone()
    splits.add_to(acc)
    flagged = splits.flagged_rows(acc if totals_with is None else torch.logaddexp(totals_with, acc))
    if flagged.size == 0:
        return acc
    at = torch.as_tensor(flagged, device=acc.device)
    acc[at] = before[at]
    return scatter_edges(acc, splits.torch_edges(flagged), splits.log_weight, rows,
                         index.torch_tables(acc.device)["perm"], totals_with=totals_with, log_normaliser=log_normaliser)


class TritonSplits:
    """Splits laid out for `triton_sums.triton_log_add_splits`: per chunk of the teacher rows that
    feed a split (as many as the memory budget allows at 8 bytes per sorted-vocabulary entry; a
    padded batch's padding rows are never read), one segment per output row, its splits by
    ascending teacher row. Splits whose node has no children have no edges: dropped. All index
    arrays reach the device in one copy."""

    def __init__(self, rows: torch.Tensor, split_row, split_end, split_node, log_weight: torch.Tensor, index,
                 memory_bytes: int, log_normaliser: torch.Tensor | None = None):
        self.rows, self.index, self.memory_bytes, self.log_normaliser = rows, index, memory_bytes, log_normaliser
        self.log_weight = log_weight.to(torch.float64).contiguous()
        node = np.asarray(split_node, dtype=np.int64)
        count = index.child_count[node] if node.size else np.zeros(0, np.int64)
        keep = count > 0
        k, end, node, count = np.asarray(split_row, dtype=np.int64)[keep], \
            np.asarray(split_end, dtype=np.int64)[keep], node[keep], count[keep]
        self.size = int(index.perm.size)
        # the running sums of the teacher rows that feed some split only, in chunks of `chunk` of them
        self.needed = np.unique(k)
        self.chunk = chunk_rows(max(self.needed.size, 1), self.size, memory_bytes, entry_bytes=8)
        place = np.searchsorted(self.needed, k)
        bucket = place // self.chunk
        order = np.lexsort((k, end, bucket))  # by chunk, then output row, then teacher row
        self.k, self.end, self.node = k[order], end[order], node[order]
        place, bucket = place[order], bucket[order]
        n = self.k.size
        new = np.ones(n, dtype=bool)
        new[1:] = (bucket[1:] != bucket[:-1]) | (self.end[1:] != self.end[:-1])
        seg_start = np.flatnonzero(new)
        num_chunks = -(-self.needed.size // self.chunk)
        self.chunk_segments = np.searchsorted(bucket[seg_start], np.arange(num_chunks + 1))
        # where each split's running sums start in its chunk's: (place - chunk start) * (size + 1)
        offset = (place - bucket * self.chunk) * (self.size + 1)
        parts = [np.append(seg_start, n), self.end[seg_start], offset, index.child_start[self.node], count[order],
                 self.k, self.end, self.needed]
        flat = torch.as_tensor(np.concatenate(parts), device=rows.device)
        (self.seg_ptr, self.seg_row, self.offset_t, self.child_t, self.count_t, k_t,
         self.end_t, self.needed_t) = flat.split([p.size for p in parts])
        self.weight_t = self.log_weight.index_select(0, k_t)
        self.empty = n == 0

    def add_to(self, acc: torch.Tensor) -> None:
        """Log-add every edge into `acc` (in place): per chunk, the running sums, then the edges."""
        from bld_scale.convert.triton_sums import TritonRunningSums, triton_log_add_splits

        tables = self.index.torch_tables(acc.device)
        sums = TritonRunningSums(min(self.chunk, max(self.needed.size, 1)), self.size, acc.device)
        for c in range(self.chunk_segments.size - 1):
            g0, g1 = int(self.chunk_segments[c]), int(self.chunk_segments[c + 1])
            sums.load(self.rows, tables["perm"], self.log_normaliser,
                      rows=self.needed_t[c * self.chunk:(c + 1) * self.chunk])
            triton_log_add_splits(acc, sums.sums, g0, g1, self.seg_ptr, self.seg_row, self.offset_t, self.weight_t,
                                  self.child_t, self.count_t, tables)

    def flagged_rows(self, seen: torch.Tensor) -> np.ndarray:
        """Output rows (ascending) with a split whose masses are too small for the totals `seen`."""
        row_total = torch.logsumexp(seen, dim=1)
        hit = masses_too_small(self.weight_t, row_total.index_select(0, self.end_t))
        if not bool(hit.any()):
            return np.zeros(0, dtype=np.int64)
        return np.unique(self.end[hit.cpu().numpy()])

    def torch_edges(self, out_rows: np.ndarray) -> dict:
        """`split_edges`' edges (torch running sums) of the splits that feed `out_rows`."""
        take = np.isin(self.end, out_rows)
        return split_edges(self.rows, self.k[take], self.end[take], self.node[take], self.log_weight, self.index,
                           self.memory_bytes, running_sums=RunningSums, log_normaliser=self.log_normaliser)
