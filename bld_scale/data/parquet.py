"""Documents from Parquet files through Hugging Face `datasets`, with null cells counted per file.

Parquet stores typed columns, so the text column is checked once by type (strings only), and a
null cell is a row without text: skipped, counted and named (file and row) in the `DataReport`.
Loaded, the whole column is checked up front with Arrow; streaming, each file is checked as it is
read through. Row numbers in messages are 1-based within their file.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator

from bld_scale.data.errors import DataError
from bld_scale.data.report import DataReport


class ParquetColumn:
    def __init__(self, paths: list[str], text_field: str, report: DataReport, streaming: bool,
                 log: Callable[[str], None] | None = None):
        import datasets
        import pyarrow.parquet as pq

        self.paths, self.text_field, self.report, self.log = list(paths), text_field, report, log
        self.key = report.key
        self.dataset = datasets.load_dataset("parquet", data_files=self.paths, split="train",
                                             streaming=streaming)
        self.streaming = streaming
        self._ends = []  # rows in files 0..k
        total = 0
        for path in self.paths:
            total += pq.ParquetFile(path).metadata.num_rows
            self._ends.append(total)
        columns = self.dataset.column_names or []
        if text_field not in columns:
            raise DataError(f"data.text_field={text_field!r} is not a column of {self.key} "
                            f"({', '.join(self.paths)}); columns: {columns}")
        feature = (self.dataset.features or {}).get(text_field)
        dtype = getattr(feature, "dtype", None)
        if feature is not None and dtype not in ("string", "large_string"):
            raise DataError(f"data.text_field={text_field!r} of {self.key} ({', '.join(self.paths)}) "
                            f"holds {dtype or type(feature).__name__} values, not text: name the "
                            "text column in data.text_field")
        self._reported = False
        if not streaming:
            self._count_nulls()
            self.finish()

    def _file_row(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def _count_nulls(self) -> None:
        import pyarrow.compute as pc

        column = self.dataset.data.column(self.text_field)
        for k, path in enumerate(self.paths):
            self.report.file(path).rows = self._ends[k] - (self._ends[k - 1] if k else 0)
        if column.null_count:
            for i in pc.indices_nonzero(pc.is_null(column).combine_chunks()).to_pylist():
                k, row = self._file_row(i)
                self.report.skip(self.paths[k], row + 1, "null")

    def finish(self, paths=None, complete: bool = True) -> None:
        self.report.check(complete)
        for line in self.report.lines(paths):
            if self.log is not None:
                self.log(line)

    def _stream(self) -> Iterator[tuple[str, str]]:
        first = not self._reported
        if first:  # a pass given up midway (a probe) counted some rows: count afresh
            self.report.files.clear()
        k = 0
        for i, row in enumerate(self.dataset):
            while i >= self._ends[k]:  # a file read through
                if first:
                    self.finish([self.paths[k]], complete=False)
                k += 1
            text = row[self.text_field]
            if first:
                self.report.row(self.paths[k])
            if text is None:
                if first:
                    self.report.skip(self.paths[k], i - (self._ends[k - 1] if k else 0) + 1, "null")
                continue
            yield self.where(i), text
        if first:
            self._reported = True
            self.finish()

    def __iter__(self) -> Iterator[str | None]:
        if self.streaming:
            return (text for _, text in self._stream())
        return (row[self.text_field] for row in self.dataset)

    def iter_located(self) -> Iterator[tuple[str, str | None]]:
        if self.streaming:
            return self._stream()
        return ((self.where(i), row[self.text_field]) for i, row in enumerate(self.dataset))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> str | None:
        return self.dataset[int(i)][self.text_field]

    def where(self, i: int) -> str:
        k, row = self._file_row(int(i))
        return f"{self.paths[k]} row {row + 1}"
