"""The row codec of a teacher cache: a next-byte distribution `[257]` <-> what a shard stores.

Three layouts, told apart by the tensors a shard holds (and recorded in the manifest: `top_k`,
`dtype`, and `max_tail_mass` or `kl_per_value` for the adaptive one):

* adaptive (`kl_per_value` lam > 0, the default, or `max_tail_mass` tau > 0; `cache.ragged`): per
  row the most probable byte values that each save at least lam bits of KL, or the fewest that
  leave at most tau of the mass out, at most k of them, stored ragged (`counts`, flat `symbols`
  and `logprobs`, `rest`);
* fixed top-k (tau = 0, k < 257; every cache made before the adaptive codec): the k most probable
  of the 256 byte values (`symbols` uint8 [R, k], `logprobs` [R, k]) and the log of the mass of every
  other outcome together (`rest` [R]);
* whole rows (k = 257): `logprobs` [R, 257], lossless in float32.

EOT (column 256) is never among the stored byte values: its mass stays in `rest`. By the spec
q_n(EOT) is non-zero only at a teacher token boundary, as the teacher's EOS mass there, which in
running text is tiny (the bench reports what it loses), and keeping it out lets a byte value fit in
one byte. Log-probabilities are stored in float16, float32 or uint8 codes of 1/16 nat, or, for the
adaptive layout, as codes of sqrt(p) with each row's most probable value implied
(`cache.sqrt_rows`). Decoding (`decode_rows`) makes a proper distribution over the 257 outcomes: the stored log-probabilities in place and the remaining
mass spread over the outcomes not stored by the cache's tail profile (`cache.tail`), per context
of the text where the cache has one.
"""
from __future__ import annotations

import math

import torch

from bld_scale.cache.quantize import DTYPES, check_dtype, check_sqrt_steps, load_logprobs, store_logprobs
from bld_scale.cache.ragged import MAX_CAP, check_adaptive, encode_ragged, ragged_kept
from bld_scale.cache.sqrt_rows import DEFAULT_SQRT_STEPS
from bld_scale.cache.tail import BYTE_VALUES, OUTCOMES, PRIOR_FLOOR, spread_rest, tail_prior  # noqa: F401 (re-exported)
from bld_scale.cache.tail import context_tail_sums as _context_tail_sums
from bld_scale.cache.tail import tail_sums as _tail_sums

FULL = OUTCOMES  # k that keeps everything


def check_top_k(k: int) -> None:
    if not 1 <= k <= FULL:
        raise ValueError(f"top-k {k} is out of range: use 1..{BYTE_VALUES} (the most probable byte values "
                         f"and the remaining mass) or {FULL} (every outcome, lossless in float32)")


def check_codec(k: int, dtype: str, tail_mass: float = 0.0, kl_per_value: float = 0.0,
                sqrt_steps: int = DEFAULT_SQRT_STEPS) -> tuple[float, float]:
    """Refuse settings no codec has; returns the (tail mass, KL per value) the cache uses (both 0 for
    k = 257, whole rows, and for a fixed top-k)."""
    check_top_k(k)
    check_dtype(dtype)
    check_sqrt_steps(sqrt_steps)
    if dtype == "sqrt" and not (k < FULL and (tail_mass or kl_per_value)):
        raise ValueError("dtype sqrt codes the adaptive rows' stored values (a KL per value or a tail mass, "
                         "k <= 255): for a fixed top-k or whole rows use uint8, float16 or float32")
    if k == FULL:
        if dtype == "uint8":
            raise ValueError("top-k 257 stores whole rows to be lossless: use --dtype float32 (or float16), "
                             "not uint8")
        return 0.0, 0.0
    if tail_mass or kl_per_value:
        check_adaptive(tail_mass, k, kl_per_value)
    return float(tail_mass), float(kl_per_value)


def encode_rows(q: torch.Tensor, k: int, dtype: str, tail_mass: float = 0.0, kl_per_value: float = 0.0,
                sqrt_steps: int = DEFAULT_SQRT_STEPS) -> dict[str, torch.Tensor]:
    """`q [R, 257]` log-probabilities (float32/64, -inf allowed) -> the tensors a shard stores.

    k = 257: {"logprobs": [R, 257]}; tail_mass or kl_per_value > 0: the adaptive layout
    (`cache.ragged`, k the cap); otherwise {"symbols": uint8 [R, k], "logprobs": [R, k], "rest": [R]}
    with `rest` the log of the mass outside the stored symbols (EOT included); dtype "sqrt" in codes of
    `sqrt_steps` steps (`cache.sqrt_rows`).
    """
    tail_mass, kl_per_value = check_codec(k, dtype, tail_mass, kl_per_value, sqrt_steps)
    q = q.to(torch.float64)
    if k == FULL:
        return {"logprobs": store_logprobs(q, dtype)}
    if tail_mass or kl_per_value:
        return encode_ragged(q, tail_mass, k, dtype, kl_per_value, sqrt_steps)
    values, symbols = torch.topk(q[:, :BYTE_VALUES], k, dim=1)
    others = q.clone()
    others.scatter_(1, symbols, -math.inf)
    rest = torch.logsumexp(others, dim=1)  # the tail's own sum: exact even when it is tiny
    return {"symbols": symbols.to(torch.uint8).contiguous(), "logprobs": store_logprobs(values, dtype),
            "rest": store_logprobs(rest, dtype)}


def kept_outcomes(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept bool [R, 257], values float64 [R, 257], rest float64 [R]: the log of each row's
    remaining mass) of a truncated layout (fixed or adaptive)."""
    if "counts" in stored:
        return ragged_kept(stored)
    symbols = stored["symbols"].long()
    rows = len(symbols)
    kept = torch.zeros(rows, OUTCOMES, dtype=torch.bool).scatter_(1, symbols, True)
    values = torch.full((rows, OUTCOMES), -math.inf, dtype=torch.float64)
    values.scatter_(1, symbols, load_logprobs(stored["logprobs"]))
    return kept, values, load_logprobs(stored["rest"])


def tail_sums(q: torch.Tensor, stored: dict[str, torch.Tensor]) -> list[float]:
    """Per outcome, the probability mass `encode_rows` left out of the stored symbols, summed over
    the rows of `q` (what a cache's `tail_prior` adds up); zeros for k = 257."""
    if "symbols" not in stored:
        return [0.0] * OUTCOMES
    return _tail_sums(q, kept_outcomes(stored)[0])


def context_tail_sums(q: torch.Tensor, stored: dict[str, torch.Tensor],
                      contexts: torch.Tensor) -> list[list[float]] | None:
    """`tail_sums` per context of the rows (`cache.tail.previous_byte_contexts`); None for k = 257."""
    if "symbols" not in stored:
        return None
    return _context_tail_sums(q, kept_outcomes(stored)[0], contexts)


def decode_rows(stored: dict[str, torch.Tensor], prior: torch.Tensor | None = None,
                contexts: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors of `encode_rows` -> `[R, 257]` float32 log-probabilities of a proper distribution
    (module docstring: the remaining mass spread over the outcomes not stored in proportion to
    `prior`, `[257]` or `[CONTEXTS, 257]` with the rows' `contexts`; uniformly when None). A row
    whose stored values are all -inf (an undefined teacher row) stays all -inf."""
    if "symbols" not in stored:
        return stored["logprobs"].float()
    return spread_rest(*kept_outcomes(stored), prior, contexts)


def bytes_per_row(k: int, dtype: str, mean_count: float | None = None) -> float:
    """Bytes one text byte costs in the shards (the window index aside): fixed top-k or whole rows,
    or, with `mean_count` (the adaptive layout), the count byte and `mean_count` entries."""
    size = DTYPES[dtype].itemsize
    if mean_count is not None:
        return 1 + size + mean_count * (1 + size)
    return OUTCOMES * size if k == FULL else k * (1 + size) + size


# The defaults (tools/cache_teacher.py): see the README's teacher-cache figures for the trade-off.
DEFAULT_KL_PER_VALUE = 0.01  # adaptive: each stored byte value saves at least this KL (bits) on its row
# (0.005 with uint8 codes and one tail profile before the profile by context and sqrt codes)
DEFAULT_TAIL_MASS = 0.0  # the default rule is the KL one (--tail-mass 0.005 was the default before it)
DEFAULT_TOP_K = MAX_CAP  # adaptive: no cap in practice
DEFAULT_FIXED_TOP_K = 32  # with tail mass 0 (a fixed top-k), when --top-k is not given
DEFAULT_DTYPE = "sqrt"  # adaptive rows: sqrt(p) codes, the most probable implied (uint8 1/16-nat log codes before)
DEFAULT_FIXED_DTYPE = "float16"  # with tail mass 0 or k = 257, when --dtype is not given (as before)
