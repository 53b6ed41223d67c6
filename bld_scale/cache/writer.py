"""Writing a teacher cache: the teacher once over the first N windows of a recipe's stream.

Shards are `windows_per_shard` consecutive windows; rank r of W writes shards r, r + W, ... (every
rank walks the stream, which is cheap next to the teacher, and converts only its own windows).
Each shard is written to a temporary name, fsynced and renamed, then its record (bytes, SHA-256)
is written atomically beside it: a rerun after an interruption skips every shard that matches its
record, and redoes the rest (missing, partial, damaged, or never recorded). No shard is written
twice, none is lost. When every rank is done, rank 0 lists the shards in manifest.json and marks
the cache complete. Rerunning on a complete cache checks every shard the same way (and redoes one
damaged since).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.cache.layout import (ADAPTIVE_KEYS, MANIFEST, cache_header, codec_label, default_compression,
                                    read_manifest, shard_bytes, shard_name, shard_problem, sidecar_name, window_index)
from bld_scale.cache.rows import DEFAULT_SQRT_STEPS, check_codec, context_tail_sums, encode_rows, tail_sums
from bld_scale.cache.tail import CONTEXT_RULE, window_contexts
from bld_scale.checkpoint.files import fsync_dir, write_atomic
from bld_scale.checkpoint.manifest import hash_file
from bld_scale.data.batch import PairTokenizer, collate, split_windows
from bld_scale.data.sources import WindowStream, open_corpus

# The tail profile by context is estimated on one shard (its 16 x 257 sums are ~70 KB of JSON: in every
# shard's record they would cost more than half a byte per text byte of a default shard); its 256
# windows are ~125k rows of 512-byte windows from the shuffled stream, plenty for 16 contexts.
PROFILE_SHARD = 0
# `rows_of(windows) -> one [len(text bytes), 257] tensor of log-probabilities per window`:
# row n is q_n, the next-byte distribution after the window's first n bytes.
RowsOf = Callable[[Sequence[str]], list]


def teacher_rows(teacher_forward, teacher_model, vocab, *, bos: int, eos: int | None, conversion: str,
                 exact_chunk_tokens: int, backend: str, device) -> RowsOf:
    """`RowsOf` from the teacher: one padded forward per call and the recipe's conversion
    (`convert.dispatch.teacher_byte_targets`, the training step's function), cut to the text's rows."""
    from bld_scale.convert.dispatch import teacher_byte_targets

    pair = PairTokenizer(vocab, vocab)

    def rows_of(windows):
        batch = collate([pair(w) for w in windows], 1, bos, bos).to(device)
        q, _, _ = teacher_byte_targets(batch, vocab, conversion=conversion, teacher_forward=teacher_forward,
                                       teacher_model=teacher_model, eos_id=eos,
                                       exact_chunk_tokens=exact_chunk_tokens, backend=backend)
        shifts, sizes = batch.teacher_shift.tolist(), batch.n_text_bytes.tolist()
        return [q[b, s:s + n].cpu() for b, (s, n) in enumerate(zip(shifts, sizes))]

    return rows_of


def windows_per_epoch(documents, window_bytes: int) -> int:
    return sum(len(split_windows(doc, window_bytes)) for doc in documents if doc)


def _header_problems(found: dict, wanted: dict) -> list[str]:
    # the adaptive rule's keys are written only when used: compared whichever side has them
    keys = dict.fromkeys(k for k in (*wanted, *ADAPTIVE_KEYS) if found.get(k) != wanted.get(k))
    return [f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} asked" for k in keys]


def _write_shard(folder: Path, index: int, tensors: dict, tail: dict, windows: tuple[int, int],
                 compression: str | None) -> None:
    path = folder / shard_name(index, compression)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(shard_bytes(tensors, compression))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)
    record = {**hash_file(path), "windows": list(windows), "rows": int(tensors["row_offsets"][-1]), **tail}
    write_atomic(folder / sidecar_name(index), json.dumps(record))


def _encode_shard(texts: Sequence[str], rows_of: RowsOf, top_k: int, dtype: str, tail_mass: float,
                  kl_per_value: float, sqrt_steps: int, batch_size: int, by_context: bool) -> tuple[dict, dict]:
    rows = []
    for i in range(0, len(texts), batch_size):
        part = texts[i:i + batch_size]
        got = rows_of(part)
        for text, r in zip(part, got):
            if r.shape != (len(text.encode("utf-8")), 257):
                raise RuntimeError(f"teacher rows of shape {tuple(r.shape)} for a window of "
                                   f"{len(text.encode('utf-8'))} bytes (one row of 257 per text byte expected)")
        rows.extend(got)
    q = torch.cat(rows)
    stored = encode_rows(q, top_k, dtype, tail_mass, kl_per_value, sqrt_steps)
    tail = {"tail_mass": tail_sums(q, stored)}
    if by_context:
        sums = context_tail_sums(q, stored, window_contexts(texts))
        if sums is not None:
            tail["tail_mass_by_context"] = sums
    return {**window_index(texts, [r.shape[0] for r in rows]), **stored}, tail


def _summed_tails(records: list[dict]) -> dict:
    """The manifest's tail profiles: the shards' tail masses summed, and the first shard's per context
    (`PROFILE_SHARD`) when its record has them (one begun before they were recorded: the overall
    profile alone)."""
    tail = {"tail_mass": [sum(col) for col in zip(*(r["tail_mass"] for r in records))]}
    if "tail_mass_by_context" in records[PROFILE_SHARD]:
        tail.update(tail_context=CONTEXT_RULE, tail_mass_by_context=records[PROFILE_SHARD]["tail_mass_by_context"])
    return tail


def build_cache(recipe, out, rows_of: RowsOf, *, top_k: int, dtype: str, max_windows: int | None = None,
                windows_per_shard: int = 256, batch_size: int = 8, rank: int = 0, world: int = 1,
                tail_mass: float = 0.0, kl_per_value: float = 0.0, sqrt_steps: int = DEFAULT_SQRT_STEPS,
                compress: bool = True, barrier: Callable[[], None] = lambda: None,
                log: Callable[[str], None] = print) -> dict:
    """Write (or finish) the cache of `recipe`'s first `max_windows` windows (default: one epoch)
    into `out`; returns its manifest. Every rank calls it; `barrier` waits for all of them.
    `kl_per_value` or `tail_mass` > 0 selects the adaptive codec and its rule, `top_k` its cap
    (`cache.rows`), `sqrt_steps` the codes' steps for dtype sqrt; `compress` compresses the shards
    (`layout.default_compression`). A cache being resumed keeps the compression it was started
    with, whatever `compress` says: it is how the bytes are kept, not what they are."""
    try:
        tail_mass, kl_per_value = check_codec(top_k, dtype, tail_mass, kl_per_value, sqrt_steps)
    except ValueError as err:
        raise TeacherCacheError(str(err)) from None
    if windows_per_shard < 1 or batch_size < 1:
        raise TeacherCacheError("windows per shard and batch size must be at least 1")
    folder = Path(out)
    corpus = open_corpus(recipe.data, log=log)
    total = max_windows if max_windows is not None else windows_per_epoch(corpus.train, recipe.data.window_bytes)
    if total < 1:
        raise TeacherCacheError(f"--max-windows {total}: cache at least one window")
    found = read_manifest(folder)  # every rank decides alike from the same files
    compression = (found.get("compression") if found is not None
                   else default_compression(dtype) if compress else None)
    wanted = cache_header(recipe, top_k=top_k, dtype=dtype, windows=total, windows_per_shard=windows_per_shard,
                          tail_mass=tail_mass, kl_per_value=kl_per_value, compression=compression,
                          sqrt_steps=sqrt_steps)
    if found is not None:
        problems = _header_problems(found, wanted)
        if problems:
            raise TeacherCacheError(f"{folder} holds a teacher cache made otherwise ({'; '.join(problems)}): "
                                    "pass another --out, or remove that folder to rebuild it")
        if found.get("complete"):  # checked again all the same: a shard damaged since is redone
            log(f"teacher cache {folder} is complete ({total} windows): checking its shards")
    barrier()
    folder.mkdir(parents=True, exist_ok=True)  # every rank: idempotent, and no rank waits on another's
    if rank == 0:
        if found is None:
            write_atomic(folder / MANIFEST, json.dumps({**wanted, "complete": False}, indent=1))
    barrier()
    stream = WindowStream(corpus.train, recipe.data.window_bytes, recipe.seed, log=log)
    n_shards = -(-total // windows_per_shard)
    done = made = 0
    for s in range(n_shards):
        first, last = s * windows_per_shard, min(total, (s + 1) * windows_per_shard)
        texts = stream.take(last - first)
        if s % world != rank:
            continue
        sidecar = folder / sidecar_name(s)
        entry = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        problem = shard_problem(folder, s, entry, compression) if entry is not None else "never written"
        if problem is None:
            done += 1
            continue
        if entry is not None:
            log(f"redoing {problem}")
        tensors, tail = _encode_shard(texts, rows_of, top_k, dtype, tail_mass, kl_per_value, sqrt_steps,
                                      batch_size, by_context=s == PROFILE_SHARD)
        _write_shard(folder, s, tensors, tail, (first, last), compression)
        made += 1
        log(f"rank {rank}: shard {s + 1}/{n_shards} (windows {first}..{last - 1}) written")
    print(f"[bld_scale] rank {rank}: {made} shards written, {done} already complete", flush=True)
    barrier()
    manifest = wanted
    if rank == 0:
        shards = {}
        for s in range(n_shards):
            sidecar = folder / sidecar_name(s)
            if not sidecar.is_file():
                raise TeacherCacheError(f"{sidecar} is missing after every rank finished: run the same "
                                        "command again to redo that shard")
            shards[shard_name(s, compression)] = json.loads(sidecar.read_text())
        tail = _summed_tails(list(shards.values()))
        for entry in shards.values():  # the manifest holds the totals; each shard's own stay in its record
            entry.pop("tail_mass", None)
            entry.pop("tail_mass_by_context", None)
        manifest = {**wanted, "complete": True, **tail, "shards": shards}
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
        log(f"teacher cache {folder}: {total} windows in {n_shards} shards ({codec_label(wanted)})")
    barrier()
    return manifest
