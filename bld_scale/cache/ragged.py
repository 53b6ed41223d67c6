"""The adaptive row codec: per text byte, only the byte values worth their bytes.

A teacher's next-byte rows range from peaked (one byte value holds 99.9 %) to diffuse (a word's
first letter: dozens of values above 1e-3). A fixed top-k pays for the diffuse rows on every row;
this codec keeps, per row, a prefix of the row's byte values in order of probability, never more
than `cap` (1..255) and never a value of zero mass (at least one value is kept). How long a prefix
is set by one of two rules:

* tail mass `tau` (`row_counts`): the fewest values that leave out at most `tau` of the mass;
* KL per value `lam` (`kl_counts`, bits): the count n that minimises KL_n + lam * n, where KL_n is
  KL(q || the row with its n most probable values kept and the rest spread evenly over the other
  outcomes). A value is stored when it saves at least `lam` bits of KL, so a row whose tail is
  flat stops early and a row with a heavy second tier keeps it. At equal KL this stores ~20 %
  fewer values than the tail-mass rule (the bench measures both).

EOT, never stored (`cache.rows`), is not counted against `tau` (a row of much EOT mass, a teacher's
EOS at a token boundary, would otherwise keep `cap` values to no avail) and is always in the rest
for `lam`. What a row leaves out, EOT included, is its `rest`, decoded through the cache's tail
profile like a fixed top-k row (`cache.tail`); the profile spreads the rest better than evenly,
so a row's decoded KL is at most about the KL_n its count was chosen with.

Storage, ragged, per shard (R rows, T = sum of counts entries), for dtypes uint8, float16, float32:
    counts    uint8 [R]  values kept per row (1..cap)
    symbols   uint8 [T]  their byte values, row after row, each row's in increasing order (a row's
                         set then repeats across rows with the text's contexts: xz stores these
                         2.5x smaller than the same values in order of probability; caches made
                         before are in order of probability, which decodes the same)
    logprobs  [T]        their log-probabilities (`cache.quantize`: uint8 codes, float16 or float32),
      or sqrt_probs uint8 [T] (caches of dtype "sqrt" made before `cache.sqrt_rows`, read only):
                         their probabilities' square roots in 6-bit codes
    rest      [R]        the log of each row's remaining mass, in the same dtype (uint8 for "sqrt")
so a row costs 1 + s + counts * (1 + s) bytes for s bytes per stored log-probability. dtype "sqrt"
keeps the same counts (over byte values 0..254) and stores them as `cache.sqrt_rows` says. A
window's rows are rows a:b (the shard's `row_offsets`) and entries
`entry_offsets[a]:entry_offsets[b]`, the running sum of `counts` (`entry_offsets`, computed when a
shard is read, not stored).
"""
from __future__ import annotations

import math

import torch

from bld_scale.cache.quantize import load_logprobs, load_sqrt, store_logprobs
from bld_scale.cache.sqrt_rows import CANDIDATES, DEFAULT_SQRT_STEPS, encode_sqrt_rows, sqrt_rows_logprobs
from bld_scale.cache.tail import BYTE_VALUES, OUTCOMES

MAX_CAP = 255  # a count is one uint8


def check_adaptive(tau: float, cap: int, kl_per_value: float = 0.0) -> None:
    if tau and kl_per_value:
        raise ValueError(f"tail mass {tau} and KL per value {kl_per_value} both given: the adaptive codec "
                         "takes one rule for a row's count; set the other to 0")
    if kl_per_value:
        if not 0 < kl_per_value < 1:
            raise ValueError(f"KL per value {kl_per_value} is out of range: use 0 < it < 1 (bits of KL a stored "
                             "byte value must save), or 0 for the tail-mass rule")
    elif not 0 < tau < 1:
        raise ValueError(f"tail mass {tau} is out of range: use 0 < tau < 1 (the most mass a row may leave "
                         "out), or 0 for a fixed top-k")
    if not 1 <= cap <= MAX_CAP:
        raise ValueError(f"top-k {cap} is out of range with a tail mass: use 1..{MAX_CAP} (the most byte values "
                         f"a row keeps), or 257 to store every outcome")


def row_counts(q: torch.Tensor, tau: float, cap: int,
               candidates: int = BYTE_VALUES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [R], values [R, cap], symbols [R, cap]): per row of `q [R, 257]` (log-probabilities),
    the fewest c >= 1 of its most probable byte values (`values`, `symbols`, in that order) that leave
    out <= `tau` of the byte values' mass, at most `cap`, at most the number of non-zero ones. Only
    the first `candidates` byte values may be kept (the others' mass counts as left out)."""
    q = q.to(torch.float64)
    values, symbols = torch.topk(q[:, :candidates], cap, dim=1)
    p = values.exp()
    left = q[:, :BYTE_VALUES].exp().sum(1, keepdim=True) - p.cumsum(1)  # left[:, j]: outside the j + 1 kept
    need = (left > tau).sum(1) + 1
    counts = torch.minimum(need, (p > 0).sum(1)).clamp(1, cap)
    return counts, values, symbols


def kl_counts(q: torch.Tensor, kl_per_value: float, cap: int,
              candidates: int = BYTE_VALUES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`row_counts` with the KL-per-value rule (module docstring): per row, the count n in 1..cap (at
    most the number of non-zero byte values) minimising KL_n / ln 2 + kl_per_value * n, the first
    such n on a tie. KL_n = sum over the m = 257 - n outcomes left out of p log p - R log(R / m),
    with R their mass (0 when R = 0): prefix sums over the sorted values, no row decoded."""
    q = q.to(torch.float64)
    values, symbols = torch.topk(q[:, :candidates], cap, dim=1)
    p_all = q.exp()
    p = values.exp()
    kept_mass = p.cumsum(1)
    kept_plogp = torch.xlogy(p, p).cumsum(1)
    rest = (p_all.sum(1, keepdim=True) - kept_mass).clamp(min=0.0)
    rest_plogp = torch.xlogy(p_all, p_all).sum(1, keepdim=True) - kept_plogp
    n = torch.arange(1, cap + 1, dtype=torch.float64, device=q.device)  # values kept
    kl = (rest_plogp - torch.xlogy(rest, rest / (OUTCOMES - n))).clamp(min=0.0)
    cost = kl / math.log(2) + kl_per_value * n
    nonzero = (p > 0).sum(1, keepdim=True).clamp(min=1)
    cost = cost.masked_fill(n > nonzero, math.inf)
    return cost.argmin(1) + 1, values, symbols


def encode_ragged(q: torch.Tensor, tau: float, cap: int, dtype: str, kl_per_value: float = 0.0,
                  sqrt_steps: int = DEFAULT_SQRT_STEPS) -> dict[str, torch.Tensor]:
    """`q [R, 257]` log-probabilities (-inf allowed) -> the tensors a shard stores (module docstring):
    the count of each row by the tail-mass rule `tau`, or by the KL-per-value rule when given."""
    check_adaptive(tau, cap, kl_per_value)
    q = q.to(torch.float64)
    candidates = CANDIDATES if dtype == "sqrt" else BYTE_VALUES
    counts, _, symbols = (kl_counts(q, kl_per_value, cap, candidates) if kl_per_value
                          else row_counts(q, tau, cap, candidates))
    if dtype == "sqrt":
        return encode_sqrt_rows(q, counts, symbols, sqrt_steps)
    take = torch.arange(cap, device=q.device) < counts.unsqueeze(1)
    kept = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(1, symbols, take)
    rest = torch.logsumexp(q.masked_fill(kept, -math.inf), dim=1)  # exact even when tiny
    # each row's entries in increasing byte value: the kept mask read row by row
    in_order = kept[:, :BYTE_VALUES]
    kept_symbols = in_order.nonzero()[:, 1]
    kept_values = q[:, :BYTE_VALUES][in_order]
    return {"counts": counts.to(torch.uint8).contiguous(), "symbols": kept_symbols.to(torch.uint8).contiguous(),
            "logprobs": store_logprobs(kept_values, dtype), "rest": store_logprobs(rest, dtype)}


def entry_offsets(counts: torch.Tensor) -> torch.Tensor:
    """int64 [R + 1]: row r's entries are entry_offsets[r]:entry_offsets[r + 1]."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.to(torch.int64).cumsum(0)])


ENTRIES = ("sqrt_codes", "sqrt_probs", "logprobs")  # a ragged shard has one of these, one per entry


def ragged_slice(stored: dict[str, torch.Tensor], offsets: torch.Tensor, a: int, b: int) -> dict[str, torch.Tensor]:
    """Rows a:b of a shard's ragged tensors (`offsets`: `entry_offsets` of its counts)."""
    lo, hi = int(offsets[a]), int(offsets[b])
    entries = next(name for name in ENTRIES if name in stored)
    steps = {"sqrt_steps": stored["sqrt_steps"]} if "sqrt_steps" in stored else {}
    return {"counts": stored["counts"][a:b], "rest": stored["rest"][a:b],
            "symbols": stored["symbols"][lo:hi], entries: stored[entries][lo:hi], **steps}


def entry_and_rest_logprobs(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [T] log-probabilities of a ragged shard's stored entries, float64 [R] the log of each
    row's remaining mass), whichever way they are coded."""
    if "sqrt_codes" in stored:
        return sqrt_rows_logprobs(stored)
    entries = load_sqrt(stored["sqrt_probs"]) if "sqrt_probs" in stored else load_logprobs(stored["logprobs"])
    return entries, load_logprobs(stored["rest"])


def ragged_kept(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept bool [R, 257], values float64 [R, 257], rest float64 [R]): the stored outcomes, their
    log-probabilities and the log of each row's remaining mass."""
    counts = stored["counts"].to(torch.int64)
    device = counts.device
    rows = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    symbols = stored["symbols"].to(torch.int64)
    kept = torch.zeros(len(counts), OUTCOMES, dtype=torch.bool, device=device)
    kept[rows, symbols] = True
    values = torch.full((len(counts), OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    entries, rest = entry_and_rest_logprobs(stored)
    values[rows, symbols] = entries
    return kept, values, rest
