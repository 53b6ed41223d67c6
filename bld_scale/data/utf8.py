"""Strict or replacing UTF-8 decoding of file contents, with the file and byte offset in errors.

`data.invalid_utf8: error` refuses a file holding bytes that are not UTF-8, naming the file, the
byte offset and the line; `replace` turns each invalid sequence into U+FFFD (as Python's
``errors="replace"`` does) and counts them, so the run can say how much text it altered.
"""
from __future__ import annotations

from bld_scale.data.errors import DataError

POLICIES = ("error", "replace")
_VALID_FFFD = "\ufffd".encode("utf-8")  # a U+FFFD already in the file is text, not a replacement


def decode_utf8(data: bytes, policy: str, where: str, key: str, base_offset: int = 0,
                line: int | None = None) -> tuple[str, int, int | None]:
    """(text, replacements, byte offset of the first one) of `data`, read from `where`.

    `base_offset` is the offset of `data` in its file and `line` its line number (JSONL rows), so
    an error points into the file, not into the row.
    """
    try:
        return data.decode("utf-8"), 0, None
    except UnicodeDecodeError as err:
        first = err.start
        if policy != "replace":
            if policy != "error":
                raise DataError(f"data.invalid_utf8: unknown policy {policy!r}; choose "
                                f"{' or '.join(POLICIES)}") from None
            at_line = line if line is not None else data.count(b"\n", 0, err.start) + 1
            raise DataError(
                f"{key}: {where} is not valid UTF-8 at byte {base_offset + err.start} (line {at_line}: "
                f"{err.reason} {data[err.start:err.end].hex(' ')}). Re-encode the file "
                "as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set data.invalid_utf8: replace to read "
                "invalid bytes as U+FFFD") from None
    text = data.decode("utf-8", "replace")
    # Invalid bytes never swallow a lead byte 0xEF, so every EF BF BD in `data` is a real U+FFFD.
    replaced = text.count("\ufffd") - data.count(_VALID_FFFD)
    return text, replaced, base_offset + first
