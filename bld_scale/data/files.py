"""Documents read from local text and JSONL files, checked as they are read.

A text file is one document; a JSONL file holds one document per line (the `data.text_field` of a
JSON object). Both are read here rather than by `datasets`, so that a problem names its file and
place: invalid UTF-8 gives the byte offset and line (`data.invalid_utf8`), and rows without usable
text are counted per file with their line numbers (`DataReport`, `data.max_skipped_fraction`).

Loaded (not streaming), every file is read once up front: the checks and reports come before
training, and JSONL rows are indexed by byte offset, so documents are then read on demand in any
order (nothing is held in memory but the offsets). Streaming, files are read in order as the
stream consumes them, and each file is checked and reported when it is first read through.
Text files keep the universal-newline reading `datasets` gave them (CRLF and CR become LF).
"""
from __future__ import annotations

import abc
import bisect
import json
from array import array
from pathlib import Path
from typing import Callable, Iterator

from bld_scale.data.errors import DataError
from bld_scale.data.report import DataReport
from bld_scale.data.utf8 import decode_utf8


class _Files(abc.ABC):
    """Shared: the file list, the report, first-pass accounting and streaming iteration."""

    row_word = "row"

    def __init__(self, paths: list[str], policy: str, report: DataReport, streaming: bool,
                 log: Callable[[str], None] | None = None):
        self.paths, self.policy, self.report = list(paths), policy, report
        self.streaming, self.log = streaming, log
        self.key = report.key
        self._checked: set[str] = set()  # files whose rows are counted in the report
        if not streaming:
            self._index()
            self.finish()

    @abc.abstractmethod
    def _rows(self, path: str, report: DataReport | None) -> Iterator[tuple[int, int, str]]:
        """(row number, byte offset, text) for each document of `path`."""

    @abc.abstractmethod
    def _index(self) -> None:
        """Read every file once: count and index its documents (a loaded corpus)."""

    def finish(self, paths=None, complete: bool = True) -> None:
        """Say what reading `paths` (default: all) altered or skipped; refuse past the limit
        (`complete`: every file has been read)."""
        self._check_field()
        self.report.check(complete)
        for line in self.report.lines(paths):
            if self.log is not None:
                self.log(line)

    def _check_field(self) -> None:
        pass

    def _place(self, path: str, row: int) -> str:
        return f"{path} {self.row_word} {row}"

    def _stream(self) -> Iterator[tuple[str, str]]:
        for path in self.paths:
            first = path not in self._checked
            if first:  # a pass given up midway (a probe) counted part of this file: count afresh
                self.report.files.pop(path, None)
            for row, _, text in self._rows(path, self.report if first else None):
                yield self._place(path, row), text
            if first:
                self._checked.add(path)
                self.finish([path], complete=len(self._checked) == len(self.paths))

    def __iter__(self) -> Iterator[str]:
        if self.streaming:
            return (text for _, text in self._stream())
        return (self[i] for i in range(len(self)))

    def iter_located(self) -> Iterator[tuple[str, str]]:
        """(where, document) pairs: where names the file and row, for messages."""
        if self.streaming:
            return self._stream()
        return ((self.where(i), self[i]) for i in range(len(self)))


class TextFiles(_Files):
    """Each file one document."""

    row_word = "file"

    def _read(self, path: str, report: DataReport | None) -> str:
        text, replaced, first = decode_utf8(Path(path).read_bytes(), self.policy, path, self.key)
        if report is not None:
            report.row(path)
            report.replaced(path, replaced, first)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text

    def _rows(self, path, report):
        yield 1, 0, self._read(path, report)

    def _index(self) -> None:
        for path in self.paths:
            self._read(path, self.report)
            self._checked.add(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return self._read(self.paths[int(i)], None)

    def where(self, i: int) -> str:
        return self.paths[int(i)]

    def _place(self, path: str, row: int) -> str:
        return path


class JsonlFiles(_Files):
    """One document per line: the string in field `text_field` of a JSON object."""

    row_word = "line"

    def __init__(self, paths, text_field: str, policy, report, streaming, log=None):
        self.text_field = text_field
        self.fields_seen: set[str] = set()
        self.with_field = 0  # rows holding the field at all (null or not)
        super().__init__(paths, policy, report, streaming, log)

    def _parse(self, raw: bytes, path: str, line: int, offset: int, report: DataReport | None):
        """The text of one line, or None after counting why there is none."""
        text, replaced, first = decode_utf8(raw, self.policy, path, self.key, offset, line)
        if report is not None:
            report.row(path)
            report.replaced(path, replaced, first)
        try:
            obj = json.loads(text)
        except ValueError:
            reason = "not valid JSON"
        else:
            if not isinstance(obj, dict):
                reason = "not a JSON object"
            else:
                if report is not None:
                    self.fields_seen.update(list(obj)[:20])
                if self.text_field not in obj:
                    reason = f"no field {self.text_field!r}"
                else:
                    self.with_field += report is not None
                    value = obj[self.text_field]
                    if isinstance(value, str):
                        return value
                    reason = "null" if value is None else f"not a string ({type(value).__name__})"
        if report is not None:
            report.skip(path, line, reason)
        return None

    def _rows(self, path, report):
        with open(path, "rb") as f:
            offset = 0
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    text = self._parse(raw, path, line, offset, report)
                    if text is not None:
                        yield line, offset, text
                offset += len(raw)

    def _index(self) -> None:
        self._offsets: list[array] = []  # per file: byte offset of each document's line
        self._lines: list[array] = []  # per file: its line number (for messages)
        self._ends: list[int] = []  # documents in files 0..k
        total = 0
        for path in self.paths:
            offsets, lines = array("q"), array("q")
            for line, offset, _ in self._rows(path, self.report):
                offsets.append(offset)
                lines.append(line)
            self._checked.add(path)
            self._offsets.append(offsets)
            self._lines.append(lines)
            total += len(offsets)
            self._ends.append(total)

    def _check_field(self) -> None:
        if self.report.rows and not self.with_field:
            fields = ", ".join(sorted(self.fields_seen)) or "none"
            raise DataError(f"data.text_field={self.text_field!r} is not a column of {self.key} "
                            f"({', '.join(sorted(self._checked)) or self.paths[0]}); fields found: {fields}")

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} outside [0, {len(self)})")
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming JSONL corpus is not indexed: its length is unknown")
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> str:
        k, j = self._locate(i)
        with open(self.paths[k], "rb") as f:
            f.seek(self._offsets[k][j])
            raw = f.readline()
        return self._parse(raw, self.paths[k], self._lines[k][j], self._offsets[k][j], None)

    def where(self, i: int) -> str:
        k, j = self._locate(i)
        return self._place(self.paths[k], self._lines[k][j])
