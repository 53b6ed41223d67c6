"""Where a truncated row's remaining mass goes: the cache's tail profile, shared by every codec.

A cache stores, per row, some outcomes' log-probabilities and the log of the mass of all the others
together (`rest`). Decoding (`spread_rest`) spreads that mass over the outcomes not stored in
proportion to the tail profile (`tail_prior`): the mass truncation removed from each outcome,
summed over every row of the cache (`tail_sums`, recorded per shard, added up in the manifest).
Without a profile the spread is uniform. The profile puts the tail where the teacher's tails
actually are (spaces, letters, punctuation rather than control bytes): on the demo teacher it
loses 2.5-7x less KL than a uniform spread (`tools/bench_teacher_cache.py` measures both); every
outcome keeps a floor (`PRIOR_FLOOR`), so a row stays a proper distribution and the KL term finite.
"""
from __future__ import annotations

import torch

OUTCOMES = 257  # 256 byte values + EOT
BYTE_VALUES = 256
PRIOR_FLOOR = 1e-9  # the least share of a row's remaining mass any outcome gets from the tail profile


def tail_sums(q: torch.Tensor, kept: torch.Tensor) -> list[float]:
    """Per outcome, the probability mass of `q [R, 257]` (log-probabilities) outside `kept`
    (bool `[R, 257]`, the outcomes stored), summed over the rows."""
    p = q.to(torch.float64).exp().masked_fill(kept, 0.0)
    return p.sum(0).tolist()


def tail_prior(sums: list[float] | None) -> torch.Tensor | None:
    """The tail profile from summed `tail_sums` (None, or no mass at all: None, a uniform spread)."""
    if sums is None:
        return None
    prior = torch.tensor(sums, dtype=torch.float64)
    if not prior.sum() > 0:
        return None
    return (prior / prior.sum()).clamp(min=PRIOR_FLOOR)


def spread_rest(kept: torch.Tensor, values: torch.Tensor, rest: torch.Tensor,
                prior: torch.Tensor | None) -> torch.Tensor:
    """`[R, 257]` float32 log-probabilities of a proper distribution: `values` (float64 `[R, 257]`)
    where `kept`, and `rest [R]` (the log of the remaining mass) spread over the other outcomes in
    proportion to `prior [257]` (uniformly when None). Stored values that do not sum to 1 with the
    rest (float16 or uint8 rounding) are renormalised; a row of no mass at all stays all -inf."""
    if prior is None:
        weights = torch.ones(kept.shape, dtype=torch.float64)
    else:
        weights = prior.to(torch.float64).expand(len(kept), -1).clone()
    weights.masked_fill_(kept, 0.0)
    out = rest.to(torch.float64).unsqueeze(1) + weights.log() - weights.sum(1, keepdim=True).log()
    out = torch.where(kept, values, out)
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    return torch.where(torch.isfinite(norm), out - norm, out).float()
