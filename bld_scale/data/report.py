"""What reading a corpus altered or left out, per file: said once, and refused past a limit.

Rows without usable text (a JSONL line without the text field, with null or a non-string there,
or not JSON at all; a null Parquet cell) are skipped, counted and named here; above
`data.max_skipped_fraction` of the rows of `data.train` (or `data.heldout`) the run is refused.
Invalid UTF-8 read under `data.invalid_utf8: replace` is counted here too.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bld_scale.data.errors import DataError

FIRST_ROWS = 5  # row numbers kept per file for the message
# A streaming corpus is judged as it is read: before its end, only on this many rows at least, so
# that one small first file with a bad row does not stop a run the whole corpus would allow.
MIN_ROWS_TO_JUDGE = 1000


@dataclass
class FileReport:
    rows: int = 0  # rows read (documents and skipped ones)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    first_skipped: list = field(default_factory=list)  # first row numbers (1-based lines for JSONL)
    replaced: int = 0  # invalid UTF-8 sequences read as U+FFFD
    first_replaced: int | None = None  # byte offset of the first one


class DataReport:
    """Counts for one recipe key (`data.train` or `data.heldout`), file by file."""

    def __init__(self, key: str, max_skipped_fraction: float, row_word: str = "row"):
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise DataError(f"data.max_skipped_fraction must be in [0, 1], got {max_skipped_fraction!r}")
        self.key, self.max_skipped_fraction, self.row_word = key, max_skipped_fraction, row_word
        self.files: dict[str, FileReport] = {}
        self.said: set[str] = set()  # files already reported (a streaming corpus re-reads them)

    def file(self, path: str) -> FileReport:
        return self.files.setdefault(path, FileReport())

    def row(self, path: str) -> None:
        self.file(path).rows += 1

    def skip(self, path: str, row: int, reason: str) -> None:
        f = self.file(path)
        f.skipped[reason] += 1
        if len(f.first_skipped) < FIRST_ROWS:
            f.first_skipped.append(row)

    def replaced(self, path: str, count: int, first_offset: int | None) -> None:
        if count:
            f = self.file(path)
            f.replaced += count
            if f.first_replaced is None:
                f.first_replaced = first_offset

    # ------------------------------------------------------------------ totals and messages
    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files.values())

    @property
    def skipped(self) -> int:
        return sum(sum(f.skipped.values()) for f in self.files.values())

    def _describe(self, path: str, f: FileReport) -> list[str]:
        out = []
        n = sum(f.skipped.values())
        if n:
            why = ", ".join(f"{reason}: {count}" for reason, count in f.skipped.most_common())
            rows = ", ".join(map(str, f.first_skipped)) + (", ..." if n > len(f.first_skipped) else "")
            out.append(f"{path}: skipped {n} of {f.rows} {self.row_word}s without text ({why}; "
                       f"{self.row_word}s {rows})")
        if f.replaced:
            out.append(f"{path}: read {f.replaced} invalid UTF-8 sequence(s) as U+FFFD (first at byte "
                       f"{f.first_replaced})")
        return out

    def lines(self, paths=None) -> list[str]:
        """One line per file with something to say (each file once; `paths` limits to those)."""
        out = []
        for path, f in self.files.items():
            if path in self.said or (paths is not None and path not in paths):
                continue
            said = self._describe(path, f)
            if said:
                self.said.add(path)
                out.extend(f"{self.key}: {line}" for line in said)
        return out

    def check(self, complete: bool = True) -> None:
        """Refuse when more than `max_skipped_fraction` of the rows read so far were skipped
        (`complete`: all rows are read; else only judged past `MIN_ROWS_TO_JUDGE` rows)."""
        rows, skipped = self.rows, self.skipped
        if not complete and rows < MIN_ROWS_TO_JUDGE:
            return
        if rows and skipped / rows > self.max_skipped_fraction:
            worst = sorted(self.files.items(), key=lambda kv: -sum(kv[1].skipped.values()))
            details = "; ".join(line for path, f in worst[:3] for line in self._describe(path, f)
                                if "skipped" in line)
            raise DataError(
                f"{self.key}: {skipped} of {rows} {self.row_word}s ({skipped / rows:.1%}) have no usable "
                f"text, more than data.max_skipped_fraction={self.max_skipped_fraction:g}: {details}. "
                "Check data.text_field and the files, or raise data.max_skipped_fraction")
