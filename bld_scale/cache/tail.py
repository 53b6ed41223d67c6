"""Where a truncated row's remaining mass goes: the cache's tail profile, shared by every codec.

A cache stores, per row, some outcomes' log-probabilities and the log of the mass of all the others
together (`rest`). Decoding (`spread_rest`) spreads that mass over the outcomes not stored in
proportion to the tail profile (`tail_prior`): the mass truncation removed from each outcome,
summed over every row of the cache (`tail_sums`, recorded per shard, added up in the manifest).
Without a profile the spread is uniform. The profile puts the tail where the teacher's tails
actually are (spaces, letters, punctuation rather than control bytes): on the demo teacher it
loses 2.5-7x less KL than a uniform spread (`tools/bench_teacher_cache.py` measures both); every
outcome keeps a floor (`PRIOR_FLOOR`), so a row stays a proper distribution and the KL term finite.

Caches written since the profile is conditioned on the text record it per context too (summed over
the cache's first shard, `cache.writer.PROFILE_SHARD`): the class of
the byte before the row's position (`previous_byte_contexts`, 16 classes: window start, space,
line breaks, lower/upper case letters, digits, punctuation groups, control bytes, and the UTF-8
roles: continuation, lead of 2, 3, 4 bytes). After a UTF-8 lead byte the tail is all continuation
bytes, after a letter mostly letters, after a full stop a space or a line break: on SmolLM2 the
context profile loses 31 % less KL than one profile (0.0082 instead of 0.0120 bits per text byte at
the default codec). Each context's profile is smoothed towards the overall one (`CONTEXT_SMOOTHING`
of mass), so a context seen rarely, or never, takes the overall profile. The decoder knows each
row's context: it holds the window's text, which the cache's window digests check.
"""
from __future__ import annotations

import numpy as np
import torch

OUTCOMES = 257  # 256 byte values + EOT
BYTE_VALUES = 256
PRIOR_FLOOR = 1e-9  # the least share of a row's remaining mass any outcome gets from the tail profile
CONTEXT_RULE = "previous byte class"  # a manifest's "tail_context": how its rows' contexts are found
CONTEXTS = 16
CONTEXT_SMOOTHING = 1.0  # mass of the overall profile added to each context's (about 20 rows' tails)


def _byte_classes() -> torch.Tensor:
    classes = torch.full((256,), 10, dtype=torch.int64)  # other ASCII symbols: - _ / @ # ...
    groups = {1: b" ", 2: b"\n\r\t", 3: bytes(range(97, 123)), 4: bytes(range(65, 91)), 5: b"0123456789",
              6: b".!?", 7: b",;:", 8: b"'\"`", 9: b"()[]{}<>"}
    for cls, members in groups.items():
        classes[list(members)] = cls
    control = [b for b in (*range(32), 127) if classes[b] == 10]
    classes[control] = 11
    classes[0x80:0xC0], classes[0xC0:0xE0], classes[0xE0:0xF0], classes[0xF0:] = 12, 13, 14, 15
    return classes


BYTE_CLASS = _byte_classes()  # class 0 is the window's start


def previous_byte_contexts(text: bytes) -> torch.Tensor:
    """int64 [len(text)]: row n's context, the class of text byte n - 1 (0 for the first row)."""
    previous = torch.from_numpy(np.frombuffer(text, dtype=np.uint8)[:-1].astype(np.int64))
    return torch.cat([torch.zeros(min(len(text), 1), dtype=torch.int64), BYTE_CLASS[previous]])


def window_contexts(texts) -> torch.Tensor:
    """The contexts of the rows of consecutive windows `texts` (str), one window after another."""
    return torch.cat([previous_byte_contexts(t.encode("utf-8")) for t in texts])


def tail_sums(q: torch.Tensor, kept: torch.Tensor) -> list[float]:
    """Per outcome, the probability mass of `q [R, 257]` (log-probabilities) outside `kept`
    (bool `[R, 257]`, the outcomes stored), summed over the rows."""
    p = q.to(torch.float64).exp().masked_fill(kept, 0.0)
    return p.sum(0).tolist()


def context_tail_sums(q: torch.Tensor, kept: torch.Tensor, contexts: torch.Tensor) -> list[list[float]]:
    """`tail_sums` per context: `[CONTEXTS][257]`, row r's mass added to context `contexts[r]`."""
    p = q.to(torch.float64).exp().masked_fill(kept, 0.0)
    return torch.zeros(CONTEXTS, p.shape[1], dtype=torch.float64).index_add_(0, contexts, p).tolist()


def tail_prior(sums: list[float] | None, by_context: list[list[float]] | None = None) -> torch.Tensor | None:
    """The tail profile from summed `tail_sums` (None, or no mass at all: None, a uniform spread):
    `[257]`, or `[CONTEXTS, 257]` with `by_context` (summed `context_tail_sums`; module docstring)."""
    if sums is None:
        return None
    prior = torch.tensor(sums, dtype=torch.float64)
    if not prior.sum() > 0:
        return None
    prior = prior / prior.sum()
    if by_context is None:
        return prior.clamp(min=PRIOR_FLOOR)
    per_context = torch.tensor(by_context, dtype=torch.float64)
    smoothed = (per_context + CONTEXT_SMOOTHING * prior) / (per_context.sum(1, keepdim=True) + CONTEXT_SMOOTHING)
    return smoothed.clamp(min=PRIOR_FLOOR)


def spread_rest(kept: torch.Tensor, values: torch.Tensor, rest: torch.Tensor,
                prior: torch.Tensor | None, contexts: torch.Tensor | None = None) -> torch.Tensor:
    """`[R, 257]` float32 log-probabilities of a proper distribution: `values` (float64 `[R, 257]`)
    where `kept`, and `rest [R]` (the log of the remaining mass) spread over the other outcomes in
    proportion to `prior` (`[257]`, or `[CONTEXTS, 257]` indexed by the rows' `contexts [R]`;
    uniformly when None). Stored values that do not sum to 1 with the rest (float16 or quantised
    codes) are renormalised; a row of no mass at all stays all -inf."""
    if prior is None:
        weights = torch.ones(kept.shape, dtype=torch.float64)
    elif prior.dim() == 2:
        if contexts is None or len(contexts) != len(kept):
            raise ValueError("a tail profile by context needs each row's context (`previous_byte_contexts`)")
        weights = prior.to(torch.float64)[contexts]
    else:
        weights = prior.to(torch.float64).expand(len(kept), -1).clone()
    weights.masked_fill_(kept, 0.0)
    out = rest.to(torch.float64).unsqueeze(1) + weights.log() - weights.sum(1, keepdim=True).log()
    out = torch.where(kept, values, out)
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    return torch.where(torch.isfinite(norm), out - norm, out).float()
