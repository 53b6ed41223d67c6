"""The row codec of a teacher cache: a next-byte distribution `[257]` <-> top-k + remaining mass.

Encoding (`encode_rows`), for k < 257: the k most probable of the 256 byte values (their byte
values as uint8, their log-probabilities in the cache's dtype) and the log of the mass of every
other outcome together (`rest`). EOT (column 256) is never among the k: its mass stays in `rest`.
By the spec q_n(EOT) is non-zero only at a teacher token boundary, as the teacher's EOS mass there,
which in running text is tiny (the bench reports what it loses), and keeping it out lets a byte
value fit in one byte. k = 257 stores the whole row (no byte values, no rest): lossless in float32.

Decoding (`decode_rows`) makes a proper distribution over the 257 outcomes: the k stored
log-probabilities in place and the remaining mass spread uniformly over the 257 - k outcomes not
stored (EOT included). Uniform is the maximum-entropy choice that assumes nothing about the tail;
the KL it loses against the full row is what `tools/bench_teacher_cache.py` measures.
"""
from __future__ import annotations

import math

import torch

OUTCOMES = 257  # 256 byte values + EOT
BYTE_VALUES = 256
FULL = OUTCOMES  # k that keeps everything
DTYPES = {"float16": torch.float16, "float32": torch.float32}


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


def decode_rows(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensors of `encode_rows` -> `[R, 257]` float32 log-probabilities of a proper distribution
    (module docstring: the remaining mass spread uniformly over the outcomes not stored). A row whose
    stored values are all -inf (an undefined teacher row) stays all -inf."""
    logprobs = stored["logprobs"].float()
    if "symbols" not in stored:
        return logprobs
    k = logprobs.shape[1]
    spread = stored["rest"].float() - math.log(OUTCOMES - k)
    out = spread.unsqueeze(1).expand(-1, OUTCOMES).clone()
    out.scatter_(1, stored["symbols"].long(), logprobs)
    # float16 rounding leaves the stored row a little off 1: renormalise (exact rows stay as they are)
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    return torch.where(torch.isfinite(norm), out - norm, out)


def bytes_per_row(k: int, dtype: str) -> int:
    """Bytes one text byte costs in the shards (the window index aside)."""
    size = DTYPES[dtype].itemsize
    return OUTCOMES * size if k == FULL else k * (1 + size) + size


# The default (tools/cache_teacher.py): see the README's teacher-cache figures for the trade-off.
DEFAULT_TOP_K = 16
DEFAULT_DTYPE = "float16"
