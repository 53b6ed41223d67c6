"""Unicode normalisation of the corpus (`data.normalize`) and the start-up check that a
tokenizer's own normaliser leaves the text unchanged.

Byte-level distillation needs each tokenizer's tokens to rebuild the window byte for byte. A
tokenizer that normalises (NFKC, say, turning the ligature 'ﬁ' into 'fi') breaks that on the
first window holding such a character. `check_normal_forms` finds this before training: for
each tokenizer form that `data.normalize` does not already apply, it scans the training and
held-out text with `unicodedata.is_normalized` (one pass at C speed, no tokenization; none at all
when no tokenizer normalises or `data.normalize` covers it) and refuses naming the tokenizer, the
first such character, where it is and the fix. With `data.normalize: nfkc` the text is NFKC
before both tokenizers see it, so an NFKC normaliser has nothing left to change.
"""
from __future__ import annotations

import time
import unicodedata
from typing import Callable, Iterable, Iterator, Sequence

from bld_scale.data.errors import DataError

FORMS = {"none": None, "nfc": "NFC", "nfd": "NFD", "nfkc": "NFKC", "nfkd": "NFKD"}
# Text in the form on the left is also in the forms on the right (NFKC output is NFC, ...).
_COVERS = {"NFC": {"NFC"}, "NFD": {"NFD"}, "NFKC": {"NFKC", "NFC"}, "NFKD": {"NFKD", "NFD"}}
_SUGGEST = {"NFC": "nfc", "NFD": "nfd", "NFKC": "nfkc", "NFKD": "nfkd"}


def unicode_form(normalize: str) -> str | None:
    if normalize not in FORMS:
        raise DataError(f"data.normalize: unknown value {normalize!r}; choose {', '.join(FORMS)}")
    return FORMS[normalize]


class NormalizedDocuments:
    """`documents` with each text put in a Unicode normal form (None and '' pass through)."""

    def __init__(self, documents, form: str):
        self.documents, self.form = documents, form
        self.streaming = getattr(documents, "streaming", False)

    def _norm(self, text):
        return unicodedata.normalize(self.form, text) if text else text

    def __iter__(self):
        return (self._norm(t) for t in self.documents)

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, i):
        return self._norm(self.documents[i])

    def iter_located(self):
        return ((where, self._norm(t)) for where, t in located(self.documents))


def normalized(documents, normalize: str):
    form = unicode_form(normalize)
    return documents if form is None else NormalizedDocuments(documents, form)


def located(documents) -> Iterator[tuple[str, str | None]]:
    """(where, text) of every document; where names the file and row when the source knows it."""
    if hasattr(documents, "iter_located"):
        return documents.iter_located()
    return ((f"document {i}", t) for i, t in enumerate(documents))


def first_change(text: str, form: str) -> int | None:
    """Index of the first character of `text` that normalising to `form` changes, or None."""
    if unicodedata.is_normalized(form, text):
        return None
    out = unicodedata.normalize(form, text)
    lo, hi = 0, min(len(text), len(out))  # longest common prefix, by slices (C speed)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text[:mid] == out[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _describe(text: str, at: int, form: str) -> str:
    """The character at `at` (with the combining marks after it) and what `form` makes of it."""
    end = at + 1
    while end < len(text) and unicodedata.combining(text[end]):
        end += 1
    seq = text[at:end]
    names = " + ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in seq)
    return f"{seq!r} ({names}) into {unicodedata.normalize(form, seq)!r}"


def check_normal_forms(corpora: Sequence[tuple[str, object]], vocabs: Iterable, normalize: str,
                       log: Callable[[str], None] | None = None) -> None:
    """Refuse (DataError) a tokenizer whose normaliser would change the text it is given.

    `corpora`: (recipe key, documents) pairs, documents as given to the windows (already put in
    `normalize`'s form). `vocabs`: objects with `name` and `normal_forms` (`TokenBytes`).
    """
    have = _COVERS.get(unicode_form(normalize), set())
    for vocab in vocabs:
        for form in getattr(vocab, "normal_forms", ()):
            if form in have:
                continue
            t0, count = time.perf_counter(), 0
            for key, documents in corpora:
                for where, text in located(documents):
                    count += 1
                    at = first_change(text, form) if text else None
                    if at is not None:
                        raise DataError(
                            f"{vocab.name} normalises text with {form}, which changes "
                            f"{_describe(text, at, form)}: {key} has it in {where} "
                            f"(character {at}), and the tokenizer's tokens would not rebuild that "
                            f"text byte for byte. Set data.normalize: {_SUGGEST[form]} to put the text "
                            f"in {form} before both tokenizers, or use a tokenizer without a "
                            "normaliser")
            if log is not None:
                log(f"{vocab.name} normalises text with {form}: checked {count} documents of "
                    f"{', '.join(k for k, _ in corpora)} in {time.perf_counter() - t0:.1f} s, none "
                    f"changes (data.normalize: {_SUGGEST[form]} would skip this pass)")
