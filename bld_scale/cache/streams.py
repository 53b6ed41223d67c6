"""A shard of sqrt rows on disk (compression "streams"): each stream compressed by the coder that suits it.

xz over a whole shard (compression "xz") treats its tensors as one byte string. The sqrt rows'
streams differ: the byte-value sets recur with the text's contexts, which a context model codes
best; the codes are noise around a few levels per byte value. So a "streams" shard is a
safetensors file of the index (`row_offsets`, `window_sha256`), `sqrt_steps`, and three byte
streams, each a uint8 tensor of its coder's output:

    rows.ppmd        every row's symbols followed by 0xFF (`sqrt_rows.DELIMITER`, a byte value never
                     stored), which also gives the counts: PPMd (pyppmd, order 6), a context model
                     that predicts a row's values from the ones before it
    sqrt_codes.xz    the stored codes (each row's first, implied, left out) ordered by their byte
                     value, so that codes of one byte value, alike, are together
    rest.xz          the rows' remaining-mass codes

On SmolLM2's held-out rows these streams take 7.51 B per text byte where xz over the same shard
took 9.28 (`tools/bench_teacher_cache.py`'s change-by-change lines); PPMd makes most of it.
Unpacking gives back exactly the tensors packed (a test checks).
"""
from __future__ import annotations

import lzma

import numpy as np
import torch

from bld_scale.cache.sqrt_rows import DELIMITER, first_entries

PPMD_ORDER = 6
PPMD_MEMORY = 32 << 20  # bytes of model memory, when packing and unpacking alike
INDEX = ("row_offsets", "window_sha256", "sqrt_steps")  # stored as they are
PACKED = ("rows.ppmd", "sqrt_codes.xz", "rest.xz")


def _ppmd(data: bytes, pack: bool) -> bytes:
    import pyppmd  # noqa: PLC0415 (only caches of compression "streams" need it)

    coder = pyppmd.compress if pack else pyppmd.decompress
    return coder(data, max_order=PPMD_ORDER, mem_size=PPMD_MEMORY, variant="I")


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _uint8(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _code_order(symbols: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Positions of the stored (not first) entries' codes, stably sorted by their byte value."""
    return torch.from_numpy(np.argsort(symbols[~first].numpy(), kind="stable"))


def pack_streams(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sqrt-rows shard's tensors (`cache.sqrt_rows` plus the index) -> the tensors of its file."""
    counts = tensors["counts"].to(torch.int64)
    symbols = tensors["symbols"]
    if (symbols == DELIMITER).any():
        raise ValueError(f"byte value {DELIMITER:#x} among a shard's stored symbols: sqrt rows never store it "
                         "(`sqrt_rows.CANDIDATES`); these tensors were not made by encode_rows")
    rows = torch.full((len(symbols) + len(counts),), DELIMITER, dtype=torch.uint8)
    row_of_entry = torch.repeat_interleave(torch.arange(len(counts)), counts)
    rows[torch.arange(len(symbols)) + row_of_entry] = symbols  # entry e moves past the e's row's delimiters
    first = first_entries(counts)
    codes = tensors["sqrt_codes"][~first][_code_order(symbols, first)]
    return {**{name: tensors[name] for name in INDEX},
            "rows.ppmd": _uint8(_ppmd(_bytes(rows), pack=True)),
            "sqrt_codes.xz": _uint8(lzma.compress(_bytes(codes))),
            "rest.xz": _uint8(lzma.compress(_bytes(tensors["rest"])))}


def unpack_streams(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_streams` reversed."""
    rows = _uint8(_ppmd(_bytes(packed["rows.ppmd"]), pack=False))
    ends = (rows == DELIMITER).nonzero()[:, 0]
    counts = torch.diff(ends, prepend=torch.tensor([-1])) - 1
    symbols = rows[rows != DELIMITER]
    first = first_entries(counts)
    codes = torch.zeros(len(symbols), dtype=torch.uint8)
    stored = torch.zeros(int((~first).sum()), dtype=torch.uint8)
    stored[_code_order(symbols, first)] = _uint8(lzma.decompress(_bytes(packed["sqrt_codes.xz"])))
    codes[~first] = stored
    return {**{name: packed[name] for name in INDEX}, "counts": counts.to(torch.uint8), "symbols": symbols,
            "sqrt_codes": codes, "rest": _uint8(lzma.decompress(_bytes(packed["rest.xz"])))}
