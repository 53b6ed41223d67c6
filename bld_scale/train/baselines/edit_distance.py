"""Levenshtein distances between byte strings, many at once, and MinED's vocabulary map.

`edit_distance_matrix(patterns, texts)` runs the bit-parallel algorithm of Myers (1999) in
Hyyrö's form for the distance between two whole strings: one pattern is a machine word of
"is this pattern byte equal to the text byte" bits, and one text byte advances every
(pattern, text) pair with a dozen integer operations, vectorised over all pairs in torch int64.
Patterns longer than 63 bytes (rare: long runs of spaces or dashes) take a plain dynamic
program vectorised over the texts.

`nearest_token_map(source, target)` gives every source-vocabulary row the target row whose bytes
are nearest in edit distance (ties: the smallest target id), which is MinED's vocabulary
mapping; it is computed once per pair of tables and cached in memory, keyed by a hash of both.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

MYERS_MAX_PATTERN = 63  # bits of an int64 word the pattern may use (the sign bit is left free)
_MAP_CACHE: dict[str, torch.Tensor] = {}


def _as_bytes(entries: Sequence[bytes | None]) -> list[bytes]:
    return [b"" if e is None else bytes(e) for e in entries]


def _padded_texts(texts: list[bytes]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texts as a byte matrix sorted by length (longest first), their lengths and the order."""
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    order = torch.argsort(lengths, descending=True, stable=True)
    width = int(lengths.max()) if len(texts) else 0
    chars = torch.zeros((len(texts), max(width, 1)), dtype=torch.long)
    for row, i in enumerate(order.tolist()):
        if texts[i]:
            chars[row, : len(texts[i])] = torch.tensor(list(texts[i]), dtype=torch.long)
    return chars, lengths[order], order


class PatternWords:
    """Patterns of 1..63 bytes as bit masks: `peq[p, c]` has bit i set where pattern p's byte i is c."""

    def __init__(self, patterns: list[bytes]):
        # narrower words cut the memory traffic when every pattern fits (the sign bit stays free)
        longest = max(len(p) for p in patterns)
        self.dtype = dtype = torch.int16 if longest <= 14 else torch.int32 if longest <= 30 else torch.long
        self.peq = torch.zeros((len(patterns), 256), dtype=dtype)
        for p, pat in enumerate(patterns):
            for i, byte in enumerate(pat):
                self.peq[p, byte] |= 1 << i
        self.m = torch.tensor([len(p) for p in patterns], dtype=dtype).unsqueeze(1)

    def distances(self, chars: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[P, T] distances to texts `chars [T, width]`, sorted longest first (`lengths`; None: all full)."""
        dtype, m = self.dtype, self.m
        P, T = self.peq.shape[0], chars.shape[0]
        top = torch.ones_like(m) << (m - 1)  # the bit of the last pattern row: the distance's row
        pv = ((torch.ones_like(m) << m) - 1).expand(P, T).clone()
        mv = torch.zeros((P, T), dtype=dtype)
        score = m.expand(P, T).clone()
        for j in range(chars.shape[1]):
            n = T if lengths is None else int((lengths > j).sum())  # texts still running
            if n == 0:
                break
            eq = self.peq[:, chars[:n, j]]
            v, w = pv[:, :n], mv[:, :n]
            xv = eq | w
            xh = (((eq & v) + v) ^ v) | eq
            ph = w | ~(xh | v)
            mh = v & xh
            score[:, :n] += ((ph & top) != 0).to(dtype) - ((mh & top) != 0).to(dtype)
            ph = (ph << 1) | 1  # row 0 of the table grows by one per text byte: a carry-in of +1
            mh = mh << 1
            pv[:, :n] = mh | ~(xv | ph)
            mv[:, :n] = ph & xv
        return score


def _myers(patterns: list[bytes], chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[P, T] distances, patterns of 1..63 bytes against texts sorted longest first."""
    return PatternWords(patterns).distances(chars, lengths)


def _dynamic_program(pattern: bytes, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[T] distances of one (long) pattern to every text: the textbook table, one row per byte."""
    T, width = chars.shape
    cols = torch.arange(width + 1, dtype=torch.long)
    row = cols.expand(T, -1).clone()  # D[0][j] = j
    for i, byte in enumerate(pattern, start=1):
        sub = row[:, :-1] + (chars != byte).long()
        new = torch.empty_like(row)
        new[:, 0] = i
        best = torch.minimum(sub, row[:, 1:] + 1)
        for j in range(1, width + 1):  # insertion depends on the left neighbour: a scan
            new[:, j] = torch.minimum(best[:, j - 1], new[:, j - 1] + 1)
        row = new
    return row[torch.arange(T), lengths]


def edit_distance_matrix(patterns: Sequence[bytes | None], texts: Sequence[bytes | None],
                         chunk: int = 1024) -> torch.Tensor:
    """[len(patterns), len(texts)] Levenshtein distances (unit costs) between byte strings.

    None counts as the empty string. Work and memory grow with len(patterns) x len(texts);
    `chunk` patterns run at once. The distance is symmetric, so put the side with the shorter
    strings in `texts` (its lengths set the number of steps).
    """
    pats, txts = _as_bytes(patterns), _as_bytes(texts)
    out = torch.zeros((len(pats), len(txts)), dtype=torch.long)
    if not pats or not txts:
        return out
    chars, lengths, order = _padded_texts(txts)
    by_order = torch.empty_like(out)
    short = [i for i, p in enumerate(pats) if 0 < len(p) <= MYERS_MAX_PATTERN]
    for k in range(0, len(short), chunk):
        rows = short[k:k + chunk]
        by_order[rows] = _myers([pats[i] for i in rows], chars, lengths).long()
    for i, p in enumerate(pats):
        if not p:
            by_order[i] = lengths
        elif len(p) > MYERS_MAX_PATTERN:
            by_order[i] = _dynamic_program(p, chars, lengths)
    out[:, order] = by_order
    return out


def table_key(source: Sequence[bytes | None], target: Sequence[bytes | None]) -> str:
    h = hashlib.sha256()
    for table in (source, target):
        h.update(len(table).to_bytes(8, "little"))
        for entry in table:
            h.update(b"\xff" if entry is None else len(entry).to_bytes(2, "little") + bytes(entry))
    return h.hexdigest()


def _by_length(entries: Sequence[bytes | None]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e:
            groups.setdefault(len(e), []).append(i)
    return groups


def nearest_token_map(source: Sequence[bytes | None], target: Sequence[bytes | None],
                      block: int = 1 << 18) -> torch.Tensor:
    """[len(source)] long: for each source row the target row nearest in edit distance (MinED).

    Ties go to the smallest target id; an exact byte match (distance 0) always wins. Target rows
    without bytes (special tokens, padding rows) are never chosen; a source row without bytes
    maps to -1 (its mass is dropped). Cached per (source, target) pair of tables in this process.

    Speed: a distance is at least the difference of the two lengths. Source rows of one length
    visit the target tokens grouped by length, nearest length first, and a row stops once the
    length difference exceeds its best distance so far (equal still runs: a smaller id may tie).
    Target tokens are the bit-parallel patterns (built once per length), source rows the texts;
    `block` bounds the pattern x text pairs of one call.
    """
    key = table_key(source, target)
    if key in _MAP_CACHE:
        return _MAP_CACHE[key]
    targets = _by_length(target)
    if not targets:
        raise ValueError("the target vocabulary has no token with bytes: nothing to map to")
    buckets = {}
    for n, ids in targets.items():
        words = [bytes(target[i]) for i in ids]
        buckets[n] = (PatternWords(words) if n <= MYERS_MAX_PATTERN else words, torch.tensor(ids, dtype=torch.long))
    result = torch.full((len(source),), -1, dtype=torch.long)
    for n_src, rows in _by_length(source).items():
        chars = torch.tensor([list(source[i]) for i in rows], dtype=torch.long)
        lengths = torch.full((len(rows),), n_src, dtype=torch.long)
        best = torch.full((len(rows),), 1 << 30, dtype=torch.long)
        best_id = torch.full((len(rows),), -1, dtype=torch.long)
        for n_tgt in sorted(buckets, key=lambda n: (abs(n - n_src), n)):
            active = torch.nonzero(best >= abs(n_tgt - n_src)).squeeze(1)
            if active.numel() == 0:
                break  # buckets come nearest length first: no later one can win or tie
            words, ids = buckets[n_tgt]
            step = max(1, block // len(ids))
            for k in range(0, active.numel(), step):
                part = active[k:k + step]
                if isinstance(words, PatternWords):
                    dist = words.distances(chars[part])
                else:  # tokens past one machine word: the plain table, one pattern at a time
                    dist = torch.stack([_dynamic_program(w, chars[part], lengths[part]) for w in words])
                d, j = dist.min(dim=0)  # the first minimum: the smallest id of the bucket
                cand = ids[j]
                better = (d < best[part]) | ((d == best[part]) & (cand < best_id[part]))
                best[part] = torch.where(better, d, best[part])
                best_id[part] = torch.where(better, cand, best_id[part])
        result[torch.tensor(rows, dtype=torch.long)] = best_id
    _MAP_CACHE[key] = result
    return result
