"""The row codec of a teacher cache: a next-byte distribution `[257]` <-> top-k + remaining mass.

Encoding (`encode_rows`), for k < 257: the k most probable of the 256 byte values (their byte
values as uint8, their log-probabilities in the cache's dtype) and the log of the mass of every
other outcome together (`rest`). EOT (column 256) is never among the k: its mass stays in `rest`.
By the spec q_n(EOT) is non-zero only at a teacher token boundary, as the teacher's EOS mass there,
which in running text is tiny (the bench reports what it loses), and keeping it out lets a byte
value fit in one byte. k = 257 stores the whole row (no byte values, no rest): lossless in float32.

Decoding (`decode_rows`) makes a proper distribution over the 257 outcomes: the k stored
log-probabilities in place and the remaining mass spread over the 257 - k outcomes not stored
(EOT included) in proportion to the cache's tail profile (`tail_prior`): the mass the truncation
removed from each outcome, summed over every row of the cache (`tail_sums`, recorded per shard,
added up in the manifest). Without a profile the spread is uniform. The profile puts the tail
where the teacher's tails actually are (spaces, letters, punctuation rather than control bytes):
on the demo teacher it loses 3-5x less KL than a uniform spread (`tools/bench_teacher_cache.py`
measures both); every outcome keeps a floor (`PRIOR_FLOOR`), so a row stays a proper distribution
and the KL term stays finite.
"""
from __future__ import annotations

import math

import torch

OUTCOMES = 257  # 256 byte values + EOT
BYTE_VALUES = 256
FULL = OUTCOMES  # k that keeps everything
DTYPES = {"float16": torch.float16, "float32": torch.float32}
PRIOR_FLOOR = 1e-9  # the least share of a row's remaining mass any outcome gets from the tail profile


def check_top_k(k: int) -> None:
    if not 1 <= k <= FULL:
        raise ValueError(f"top-k {k} is out of range: use 1..{BYTE_VALUES} (the most probable byte values "
                         f"and the remaining mass) or {FULL} (every outcome, lossless in float32)")


def encode_rows(q: torch.Tensor, k: int, dtype: str) -> dict[str, torch.Tensor]:
    """`q [R, 257]` log-probabilities (float32/64, -inf allowed) -> the tensors a shard stores.

    k = 257: {"logprobs": [R, 257]}; k < 257: {"symbols": uint8 [R, k], "logprobs": [R, k],
    "rest": [R]} with `rest` the log of the mass outside the stored symbols (EOT included).
    """
    check_top_k(k)
    store = DTYPES[dtype]
    q = q.to(torch.float64)
    if k == FULL:
        return {"logprobs": q.to(store).contiguous()}
    values, symbols = torch.topk(q[:, :BYTE_VALUES], k, dim=1)
    others = q.clone()
    others.scatter_(1, symbols, -math.inf)
    rest = torch.logsumexp(others, dim=1)  # the tail's own sum: exact even when it is tiny
    return {"symbols": symbols.to(torch.uint8).contiguous(), "logprobs": values.to(store).contiguous(),
            "rest": rest.to(store).contiguous()}


def tail_sums(q: torch.Tensor, stored: dict[str, torch.Tensor]) -> list[float]:
    """Per outcome, the probability mass `encode_rows` left out of the stored symbols, summed over
    the rows of `q` (what a cache's `tail_prior` adds up); zeros for k = 257."""
    if "symbols" not in stored:
        return [0.0] * OUTCOMES
    p = q.to(torch.float64).exp()
    p.scatter_(1, stored["symbols"].long(), 0.0)
    return p.sum(0).tolist()


def tail_prior(sums: list[float] | None) -> torch.Tensor | None:
    """The tail profile from summed `tail_sums` (None, or no mass at all: None, a uniform spread)."""
    if sums is None:
        return None
    prior = torch.tensor(sums, dtype=torch.float64)
    if not prior.sum() > 0:
        return None
    return (prior / prior.sum()).clamp(min=PRIOR_FLOOR)


def decode_rows(stored: dict[str, torch.Tensor], prior: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors of `encode_rows` -> `[R, 257]` float32 log-probabilities of a proper distribution
    (module docstring: the remaining mass spread over the outcomes not stored, in proportion to
    `prior [257]`, uniformly when None). A row whose stored values are all -inf (an undefined
    teacher row) stays all -inf."""
    logprobs = stored["logprobs"].float()
    if "symbols" not in stored:
        return logprobs
    k = logprobs.shape[1]
    symbols = stored["symbols"].long()
    rest = stored["rest"].double().unsqueeze(1)
    if prior is None:
        out = (rest - math.log(OUTCOMES - k)).expand(-1, OUTCOMES).clone()
    else:
        weights = prior.to(torch.float64).expand(len(rest), -1).clone()
        weights.scatter_(1, symbols, 0.0)
        out = rest + weights.log() - weights.sum(1, keepdim=True).log()
    out.scatter_(1, symbols, logprobs.double())
    # float16 rounding leaves the stored row a little off 1: renormalise (exact rows stay as they are)
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    return torch.where(torch.isfinite(norm), out - norm, out).float()


def bytes_per_row(k: int, dtype: str) -> int:
    """Bytes one text byte costs in the shards (the window index aside)."""
    size = DTYPES[dtype].itemsize
    return OUTCOMES * size if k == FULL else k * (1 + size) + size


# The default (tools/cache_teacher.py): see the README's teacher-cache figures for the trade-off.
DEFAULT_TOP_K = 32
DEFAULT_DTYPE = "float16"
