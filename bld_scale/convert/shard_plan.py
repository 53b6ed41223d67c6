"""Sequence-parallel conversion, the part without collectives: who computes which byte rows, and
how partial rows are packed, moved and combined.

Under sequence parallelism (`parallel.sequence_parallel: N`) each of the N ranks of a group holds a
contiguous slice of a window's teacher rows (`[BOS] + t_1..t_L`, rows `[k0, k1)`) and a contiguous
slice of its student positions; the two slices need not cover the same bytes. The teacher's
logits never leave their rank: each rank converts its own rows into *partial* byte rows, the
unnormalised log-space sums of `docs/byte-interface.md` restricted to its own tokens (`k` in
`[k0, k1)`):

    acc_r[n, b] = log sum_{k in [k0, k1), s_k <= n} P(t_<k) · M_k(x[s_k..n) + b)     (and EOT)

The full sum is the log-add of the ranks' partial rows, so the converted row `n` is the
normalised log-add over every rank whose tokens reach `n`. A rank's tokens reach the bytes
`[s_k0, e_last + max_token_len - 1)` (`contribution_range`): its own bytes and a *halo* of at most
`max_token_len - 2` bytes owned by the next rank (a token starting before the split that covers
bytes after it), and, for mode exact, the contexts that start inside its tokens, which reach as
far. `P(t_<k)` needs the canonical log-probability of every token before the slice: the
exclusive prefix sum over the group of each rank's sum (`exclusive_prefix`).

Rows move by byte offset: every rank knows (from the batch, which each rank holds whole) which
byte rows every rank's student slots read (`wanted`) and which rows every rank can contribute to,
so the routing (`routing_plan`) needs no exchange of counts: rank `src` sends to `dst` its partial
rows for `wanted[dst]` inside its range, in ascending order. A student token that straddles a
split, or a row in a halo, gets rows from two ranks, combined on arrival (`combine_rows`).
A row travels as 257 float32 log-probabilities normalised on the sender plus its float64
log-normaliser split into two float32 (`pack_rows`): 1036 bytes per byte row.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.byte_rows import EOT, NUM_BYTE_OUTCOMES, normalise_rows

PACKED_WIDTH = NUM_BYTE_OUTCOMES + 2  # the normalised row, then its log-normaliser as two float32
PACKED_ROW_BYTES = PACKED_WIDTH * 4


def even_bounds(length: int, parts: int) -> list[int]:
    """Contiguous slices of `length` positions over `parts` ranks, as DeepSpeed's Ulysses splits
    a sequence padded to a multiple of `parts`: `ceil(length / parts)` each, the last ones short."""
    if parts < 1:
        raise ValueError(f"sequence-parallel size must be at least 1, got {parts}")
    chunk = -(-length // parts)
    return [min(length, r * chunk) for r in range(parts + 1)]


def token_ends(starts: np.ndarray, n_bytes: int) -> np.ndarray:
    """End offset of each canonical token (the next one's start; the last one ends the text)."""
    return np.append(starts[1:], n_bytes).astype(np.int64) if len(starts) else np.zeros(0, np.int64)


def contribution_range(starts: np.ndarray, n_bytes: int, k0: int, k1: int, max_token_len: int) -> tuple[int, int]:
    """Byte rows `[lo, hi)` that teacher rows `[k0, k1)` can put mass on (empty `(0, 0)` when the
    slice holds no canonical token: only the row after the last token, or padding).

    A split of token k ends at `n <= s_k + max_token_len - 1`; an exact-mode context starting at
    `e < e_last` ends at `n <= e + max_token_len - 1`; so `hi = e_last + max_token_len - 1` bounds
    both, capped at the text's last row `N - 1` (row N is all EOT on every rank).
    """
    k1 = min(k1, len(starts))
    if k0 >= k1:
        return 0, 0
    ends = token_ends(np.asarray(starts), n_bytes)
    return int(starts[k0]), int(min(n_bytes, ends[k1 - 1] + max(max_token_len, 1) - 1))


def routing_plan(ranges: Sequence[tuple[int, int]], wanted: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """`plan[src][dst]`: the byte rows `src` sends `dst` (ascending): `wanted[dst]` inside `src`'s range."""
    plan = []
    for lo, hi in ranges:
        plan.append([w[(w >= lo) & (w < hi)] for w in wanted])
    return plan


def exclusive_prefix(rank_sums: torch.Tensor, rank: int) -> torch.Tensor:
    """`rank_sums [world, ...]`: each rank's sum of canonical log-probabilities; the sum of those
    before `rank` (log P of the canonical prefix before its first token), float64."""
    return rank_sums[:rank].double().sum(0)


def pack_rows(acc: torch.Tensor) -> torch.Tensor:
    """Unnormalised float64 log rows `[n, 257]` -> `[n, 259]` float32: the row normalised, then its
    log-normaliser `lse` as `hi = float32(lse)`, `lo = float32(lse - hi)` (float64 precision kept
    where it matters: prefix log-probabilities reach -1e5 over a long window)."""
    lse = torch.logsumexp(acc, dim=1)
    finite = torch.isfinite(lse)
    rows = torch.where(finite.unsqueeze(1), acc - torch.where(finite, lse, 0.0).unsqueeze(1), acc)
    hi = torch.where(finite, lse, -math.inf).float()
    lo = torch.where(finite, lse - hi.double(), 0.0).float()
    return torch.cat([rows.float(), hi.unsqueeze(1), lo.unsqueeze(1)], dim=1)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """`pack_rows` undone: float64 unnormalised log rows `[n, 257]` (-inf rows stay -inf)."""
    lse = packed[:, NUM_BYTE_OUTCOMES].double() + packed[:, NUM_BYTE_OUTCOMES + 1].double()
    rows = packed[:, :NUM_BYTE_OUTCOMES].double()
    return torch.where(torch.isfinite(lse).unsqueeze(1), rows + lse.unsqueeze(1), rows)


def combine_rows(wanted: np.ndarray, pieces: Sequence[tuple[np.ndarray, torch.Tensor]], n_bytes: int,
                 device) -> torch.Tensor:
    """Normalised float32 rows `[len(wanted), 257]` for the ascending byte rows `wanted`, from
    `(rows, packed)` pieces of the ranks that reach them (log-added); row `n_bytes` is all EOT."""
    acc = torch.full((len(wanted), NUM_BYTE_OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    for rows, packed in pieces:
        if len(rows) == 0:
            continue
        slot = torch.as_tensor(np.searchsorted(wanted, rows), device=device)
        acc.index_copy_(0, slot, torch.logaddexp(acc.index_select(0, slot), unpack_rows(packed.to(device))))
    last = torch.as_tensor(wanted == n_bytes, device=device)
    if bool(last.any()):
        acc[last] = -math.inf
        acc[last, EOT] = 0.0
    return normalise_rows(acc)
