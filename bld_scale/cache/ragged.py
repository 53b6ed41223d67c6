"""The adaptive row codec: per text byte, the fewest byte values that leave at most `tau` of the mass.

A teacher's next-byte rows range from peaked (one byte value holds 99.9 %) to diffuse (a word's
first letter: dozens of values above 1e-3). A fixed top-k pays for the diffuse rows on every row;
this codec keeps, per row, the most probable byte values in order until the mass of the byte
values left out is at most `tau` (`row_counts`), never more than `cap` (1..255) and never a value of
zero mass (at least one value is kept). EOT, never stored (`cache.rows`), is not counted against
`tau`: a row of much EOT mass (a teacher's EOS at a token boundary) would otherwise keep `cap`
values to no avail. What a row leaves out, EOT included, is its `rest`, decoded through the
cache's tail profile like a fixed top-k row (`cache.tail`), so KL(q || decoded) per row is about
the KL of moving at most `tau` of mass: `tools/bench_teacher_cache.py` measures it per `tau`.

Storage, ragged, per shard (R rows, T = sum of counts entries):
    counts    uint8 [R]  values kept per row (1..cap)
    symbols   uint8 [T]  their byte values, row after row, most probable first
    logprobs  [T]        their log-probabilities (`cache.quantize`: uint8 codes, float16 or float32)
    rest      [R]        the log of each row's remaining mass, in the same dtype
so a row costs 1 + s + counts * (1 + s) bytes for s bytes per stored log-probability. A window's
rows are rows a:b (the shard's `row_offsets`) and entries `entry_offsets[a]:entry_offsets[b]`, the
running sum of `counts` (`entry_offsets`, computed when a shard is read, not stored).
"""
from __future__ import annotations

import math

import torch

from bld_scale.cache.quantize import load_logprobs, store_logprobs
from bld_scale.cache.tail import BYTE_VALUES, OUTCOMES

MAX_CAP = 255  # a count is one uint8


def check_adaptive(tau: float, cap: int) -> None:
    if not 0 < tau < 1:
        raise ValueError(f"tail mass {tau} is out of range: use 0 < tau < 1 (the most mass a row may leave "
                         "out), or 0 for a fixed top-k")
    if not 1 <= cap <= MAX_CAP:
        raise ValueError(f"top-k {cap} is out of range with a tail mass: use 1..{MAX_CAP} (the most byte values "
                         f"a row keeps), or 257 to store every outcome")


def row_counts(q: torch.Tensor, tau: float, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [R], values [R, cap], symbols [R, cap]): per row of `q [R, 257]` (log-probabilities),
    the fewest c >= 1 of its most probable byte values (`values`, `symbols`, in that order) that leave
    out <= `tau` of the byte values' mass, at most `cap`, at most the number of non-zero ones."""
    q = q.to(torch.float64)
    values, symbols = torch.topk(q[:, :BYTE_VALUES], cap, dim=1)
    p = values.exp()
    left = q[:, :BYTE_VALUES].exp().sum(1, keepdim=True) - p.cumsum(1)  # left[:, j]: outside the j + 1 kept
    need = (left > tau).sum(1) + 1
    counts = torch.minimum(need, (p > 0).sum(1)).clamp(1, cap)
    return counts, values, symbols


def encode_ragged(q: torch.Tensor, tau: float, cap: int, dtype: str) -> dict[str, torch.Tensor]:
    """`q [R, 257]` log-probabilities (-inf allowed) -> the tensors a shard stores (module docstring)."""
    check_adaptive(tau, cap)
    q = q.to(torch.float64)
    counts, values, symbols = row_counts(q, tau, cap)
    take = torch.arange(cap, device=q.device) < counts.unsqueeze(1)
    kept = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(1, symbols, take)
    rest = torch.logsumexp(q.masked_fill(kept, -math.inf), dim=1)  # exact even when tiny
    return {"counts": counts.to(torch.uint8).contiguous(), "symbols": symbols[take].to(torch.uint8).contiguous(),
            "logprobs": store_logprobs(values[take], dtype), "rest": store_logprobs(rest, dtype)}


def entry_offsets(counts: torch.Tensor) -> torch.Tensor:
    """int64 [R + 1]: row r's entries are entry_offsets[r]:entry_offsets[r + 1]."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.to(torch.int64).cumsum(0)])


def ragged_slice(stored: dict[str, torch.Tensor], offsets: torch.Tensor, a: int, b: int) -> dict[str, torch.Tensor]:
    """Rows a:b of a shard's ragged tensors (`offsets`: `entry_offsets` of its counts)."""
    lo, hi = int(offsets[a]), int(offsets[b])
    return {"counts": stored["counts"][a:b], "rest": stored["rest"][a:b],
            "symbols": stored["symbols"][lo:hi], "logprobs": stored["logprobs"][lo:hi]}


def ragged_kept(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept bool [R, 257], values float64 [R, 257]): the stored outcomes and their log-probabilities."""
    counts = stored["counts"].to(torch.int64)
    device = counts.device
    rows = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    symbols = stored["symbols"].to(torch.int64)
    kept = torch.zeros(len(counts), OUTCOMES, dtype=torch.bool, device=device)
    kept[rows, symbols] = True
    values = torch.full((len(counts), OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    values[rows, symbols] = load_logprobs(stored["logprobs"])
    return kept, values
