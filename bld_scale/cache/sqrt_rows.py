"""The default row codec (dtype "sqrt"): sqrt codes, each row's most probable value implied.

Per row, the byte values the adaptive rule keeps (`cache.ragged`: KL per value or tail mass, the
same counts) are stored with their probabilities' square roots in codes of `sqrt_steps` steps
(`cache.quantize`), all but the most probable one: its probability is what the others and the
remaining mass leave, 1 - rest - sum(others), found when decoding. Its error is then the sum of
the others' errors, small in absolute terms next to it, and an error e on a value p costs about
e^2 / 2p of KL, least on the largest p: one code per row fewer for next to no KL (SmolLM2, with
the rest a sqrt code too and xz over whole shards: 9.63 -> 9.28 B per text byte for 1e-4 bits,
`tools/bench_teacher_cache.py`'s change-by-change lines). The remaining mass has a sqrt code of the
same steps, like any value (code 0: below half a step).

Byte value 0xFF is never stored, like EOT: it never occurs in UTF-8 text, so a teacher leaves next
to no mass on it (its mass is in the rest), and the packed shard delimits rows with it
(`cache.streams`).

Tensors (R rows, T = sum of counts entries):
    counts      uint8 [R]  values kept per row (1..cap)
    symbols     uint8 [T]  each row's byte values: its most probable first, then the others in
                           increasing byte value (sets that recur with the text's contexts)
    sqrt_codes  uint8 [T]  their sqrt codes, 0 on each row's first entry (implied)
    rest        uint8 [R]  the sqrt code of each row's remaining mass (EOT and 0xFF included)
    sqrt_steps  uint8 [1]  the codes' steps
"""
from __future__ import annotations

import math

import torch

from bld_scale.cache.quantize import check_sqrt_steps, load_sqrt, load_sqrt_mass, store_sqrt, store_sqrt_mass
from bld_scale.cache.tail import OUTCOMES

DELIMITER = 0xFF  # never stored: a byte value that UTF-8 text never has
CANDIDATES = DELIMITER  # byte values 0..254 may be stored
DEFAULT_SQRT_STEPS = 47  # see the README's teacher-cache figures for the trade-off


def encode_sqrt_rows(q: torch.Tensor, counts: torch.Tensor, by_probability: torch.Tensor,
                     steps: int) -> dict[str, torch.Tensor]:
    """`q [R, 257]` log-probabilities with each row's `counts` and its byte values in order of
    probability (`by_probability [R, >= max count]`, from `ragged.kl_counts` or `row_counts` over
    the first `CANDIDATES` values) -> the tensors of the module docstring."""
    check_sqrt_steps(steps)
    q = q.to(torch.float64)
    undefined = torch.isneginf(q).all(1)
    if undefined.any():
        raise ValueError(f"row {int(undefined.nonzero()[0])} has no mass at all (an undefined teacher row): sqrt "
                         "rows store proper distributions only; cache such rows with --dtype float32")
    take = torch.arange(by_probability.shape[1], device=q.device) < counts.unsqueeze(1)
    kept = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(1, by_probability, take)
    rest = torch.logsumexp(q.masked_fill(kept, -math.inf), dim=1)
    rows, symbols = kept.nonzero(as_tuple=True)  # row after row, in increasing byte value
    first = symbols == by_probability[rows, 0]
    # each row's first the most probable, then the others in increasing byte value (keys < 257 per row)
    order = torch.argsort(rows * (OUTCOMES + 1) + torch.where(first, 0, symbols + 1))
    rows, symbols, first = rows[order], symbols[order], first[order]
    codes = store_sqrt(q[rows, symbols], steps).masked_fill_(first, 0)
    return {"counts": counts.to(torch.uint8).contiguous(), "symbols": symbols.to(torch.uint8).contiguous(),
            "sqrt_codes": codes, "rest": store_sqrt_mass(rest, steps),
            "sqrt_steps": torch.tensor([steps], dtype=torch.uint8)}


def first_entries(counts: torch.Tensor) -> torch.Tensor:
    """bool [sum of counts]: each row's first entry (every row has at least one)."""
    counts = counts.to(torch.int64)
    first = torch.zeros(int(counts.sum()), dtype=torch.bool)
    first[counts.cumsum(0) - counts] = True
    return first


def sqrt_rows_logprobs(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [T] log-probabilities of the stored entries, the implied ones found; float64 [R] the
    log of each row's remaining mass)."""
    steps = int(stored["sqrt_steps"][0])
    counts = stored["counts"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = first_entries(counts)
    logp = load_sqrt(stored["sqrt_codes"], steps)
    rest = load_sqrt_mass(stored["rest"], steps)
    others = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, rows[~first], logp[~first].exp())
    # a code is never below 1 / steps^2: neither is the implied value, whatever the others' errors add up to
    implied = (1.0 - others - rest.exp()).clamp(min=steps ** -2.0).log()
    return torch.where(first, implied[rows], logp), rest
