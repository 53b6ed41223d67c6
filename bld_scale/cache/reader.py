"""Reading a teacher cache during training: the byte targets of a batch, by global window index.

`TeacherCache.open(folder, recipe, ...)` refuses, before any model loads, a cache that is
incomplete, made from another teacher, tokenizer, conversion or window settings, made with
another teacher BOS, or too short for the run (`TeacherCacheError`, one line naming the mismatch
and the fix). Each shard's SHA-256 is checked when it is first read; each window's text is
checked against the cached window's digest, so a cache from other data is refused at its first
window. A window past the cached ones is refused too: there is no silent wrap.

`targets(batch, windows, first)` lays the cached rows out as `convert.dispatch.teacher_byte_targets`
lays a conversion out (padded `[B, N_max + 1, 257]` or packed `[1, R, 257]`, row `offset + shift`
of each window; the rows the byte head never reads, the dummy-prefix row and q_N, are filled as
-inf and all-EOT), so `train.step.distill_step` uses them unchanged (`teacher_targets=`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.cache.layout import (COMPRESSIONS, codec_label, read_manifest, shard_name, shard_problem, shard_tensors,
                                    source_problems, window_digest)
from bld_scale.cache.ragged import entry_offsets, ragged_slice
from bld_scale.cache.rows import OUTCOMES, decode_rows, tail_prior
from bld_scale.cache.tail import CONTEXT_RULE, previous_byte_contexts
from bld_scale.convert.byte_rows import pad_byte_rows

BUILD = "tools/cache_teacher.py --config RECIPE --out DIR"


class TeacherCache:
    """A complete, checked teacher cache; `targets` serves a batch's byte targets."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.windows = int(manifest["windows"])
        self.per_shard = int(manifest["windows_per_shard"])
        self._shard: tuple[int, dict] | None = None  # the one shard held in memory
        # where truncated rows' remaining mass goes: per context of the text when the cache has it
        self.prior = tail_prior(manifest.get("tail_mass"), manifest.get("tail_mass_by_context"))

    @property
    def codec(self) -> str:
        """How its rows are stored, in words (`layout.codec_label`)."""
        return codec_label(self.manifest)

    @classmethod
    def open(cls, folder, recipe, windows_needed: int) -> "TeacherCache":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise TeacherCacheError(f"distill.teacher_cache={folder}: no manifest.json there; build the "
                                    f"cache with {BUILD}")
        if not manifest.get("complete"):
            raise TeacherCacheError(f"distill.teacher_cache={folder} is incomplete (its build was interrupted): "
                                    f"run the same {BUILD} command again to finish it")
        if recipe.distill.method != "bld":
            raise TeacherCacheError(f"distill.teacher_cache holds byte targets, which only distill.method=bld "
                                    f"reads; this recipe has method {recipe.distill.method!r}: set "
                                    "distill.method=bld or remove distill.teacher_cache")
        if manifest.get("compression") not in (None, *COMPRESSIONS):
            raise TeacherCacheError(f"distill.teacher_cache={folder}: its shards are compressed with "
                                    f"{manifest['compression']!r}, which this bld_scale does not read (only "
                                    f"{' or '.join(map(repr, COMPRESSIONS))}): use the bld_scale version that made "
                                    "it, or build it again")
        if manifest.get("tail_context", CONTEXT_RULE) != CONTEXT_RULE:
            raise TeacherCacheError(f"distill.teacher_cache={folder}: its tail profile is by "
                                    f"{manifest['tail_context']!r}, which this bld_scale does not know (only "
                                    f"{CONTEXT_RULE!r}): use the bld_scale version that made it, or build it again")
        problems = source_problems(manifest, recipe)
        if problems:
            raise TeacherCacheError(f"distill.teacher_cache={folder} was made for another run: {'; '.join(problems)}. "
                                    f"Build a cache for this recipe ({BUILD}) or use the recipe it was made with")
        cache = cls(folder, manifest)
        if windows_needed > cache.windows:
            raise TeacherCacheError(
                f"distill.teacher_cache={folder} holds {cache.windows} windows but this run takes {windows_needed} "
                f"(train.max_steps x global batch): build it with --max-windows {windows_needed} or more, or "
                "lower train.max_steps")
        return cache

    def _load(self, shard: int) -> dict:
        if self._shard is not None and self._shard[0] == shard:
            return self._shard[1]
        compression = self.manifest.get("compression")
        name = shard_name(shard, compression)
        problem = shard_problem(self.folder, shard, self.manifest["shards"].get(name), compression)
        if problem is not None:
            raise TeacherCacheError(f"distill.teacher_cache={self.folder}: {problem}; run the {BUILD} command "
                                    "that made it again: it redoes damaged shards")
        tensors = shard_tensors((self.folder / name).read_bytes(), compression)
        if "counts" in tensors:  # the adaptive layout: where each row's entries start
            tensors["entry_offsets"] = entry_offsets(tensors["counts"])
        self._shard = (shard, tensors)
        return tensors

    def window_rows(self, index: int, text: str) -> torch.Tensor:
        """`[N, 257]` float32 decoded rows of stream window `index`, whose text must be `text`."""
        if not 0 <= index < self.windows:
            raise TeacherCacheError(
                f"window {index} is past the {self.windows} windows distill.teacher_cache={self.folder} holds: "
                f"the run stops here rather than wrap; build the cache with a larger --max-windows")
        shard, i = divmod(index, self.per_shard)
        t = self._load(shard)
        if bytes(t["window_sha256"][i].tolist()) != window_digest(text):
            raise TeacherCacheError(
                f"window {index}'s text differs from the one distill.teacher_cache={self.folder} was made from "
                f"(data.train {self.manifest['data']['train']}): other data; build a cache from this recipe's data "
                f"({BUILD})")
        a, b = int(t["row_offsets"][i]), int(t["row_offsets"][i + 1])
        if "counts" in t:
            stored = ragged_slice(t, t["entry_offsets"], a, b)
        else:  # fixed top-k or whole rows: one row of the tensors per text byte
            stored = {name: t[name][a:b] for name in ("symbols", "logprobs", "rest") if name in t}
        by_context = self.prior is not None and self.prior.dim() == 2
        return decode_rows(stored, self.prior, previous_byte_contexts(text.encode("utf-8")) if by_context else None)

    def targets(self, batch, windows: Sequence[str], first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(byte_logprobs, mask) of `batch` (made from `windows`, stream windows `first`, `first + 1`, ...)
        in the layout of `convert.dispatch.teacher_byte_targets`."""
        rows = []
        for b, text in enumerate(windows):
            body = self.window_rows(first + b, text)
            shift = int(batch.teacher_shift[b])
            lead = torch.full((shift, OUTCOMES), -math.inf)  # the dummy-prefix row: never read
            end = torch.full((1, OUTCOMES), -math.inf)
            end[0, OUTCOMES - 1] = 0.0  # q_N: all mass on EOT
            rows.append(torch.cat([lead, body, end]))
        device = batch.teacher_shift.device
        if getattr(batch, "packing", None) is None:
            q, mask = pad_byte_rows(rows)
            return q.to(device), mask.to(device)
        q = torch.cat(rows).unsqueeze(0)
        if q.shape[1] != batch.packing.byte_row_bounds[-1]:
            raise RuntimeError(f"cached rows {q.shape[1]} != the packed layout's {batch.packing.byte_row_bounds[-1]}")
        return q.to(device), torch.ones(q.shape[:2], dtype=torch.bool, device=device)
