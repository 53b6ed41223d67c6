"""manifest.json: every file of a checkpoint with its size and SHA-256, so that a checkpoint can be
verified on its own, before anything loads it.

    {"manifest": 1, "algorithm": "sha256",
     "files": {"meta.json": {"bytes": 3292, "sha256": "9f2c..."},
               "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": {"bytes": 9571519, "sha256": "..."}, ...}}

Written last, after meta.json and before the folder is renamed into place, so a `step-N` folder
without one was either saved before manifests existed (its meta.json has no "manifest" key) or is
damaged. `sha256sum` can check any entry by hand.

Hashing cost: SHA-256 runs at ~0.7-2 GB/s per core. The work is split by file owner (`owner`):
each rank hashes the files it wrote itself (DeepSpeed's `*_rank_R_*` shards, `rng/rank-R.pt`) while
they are still in its page cache, rank 0 the few shared ones; a 100+ GB checkpoint on 64 ranks is
~2 GB, a few seconds, per rank. A resume re-hashes the same way (each rank the shards it is about
to load, which also warms its cache for the load); the tools, one process, use threads.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bld_scale.checkpoint.errors import CheckpointFormatError, DamagedCheckpointError
from bld_scale.checkpoint.files import MANIFEST, META, UNIVERSAL_TAG, write_atomic

MANIFEST_VERSION = 1
ALGORITHM = "sha256"
CHUNK = 8 << 20
_RANK_IN_NAME = re.compile(r"(?:^|[_-])rank[_-]0*(\d+)(?=[_.-]|$)")


def checkpoint_files(step_dir: Path) -> list[str]:
    """The files of a checkpoint folder, relative POSIX paths, sorted; not the manifest itself, nor
    the universal conversion a later resume may add (`ds_universal/`)."""
    step_dir = Path(step_dir)
    out = []
    for path in step_dir.rglob("*"):
        rel = path.relative_to(step_dir)
        if rel.parts[0].startswith(UNIVERSAL_TAG) or rel.as_posix() == MANIFEST or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def owner(rel: str, world: int) -> int:
    """The rank that hashes `rel`: the rank in its name (DeepSpeed's `zero_pp_rank_3_...`, our
    `rng/rank-00003.pt`; modulo `world` when the checkpoint was saved by more ranks), or rank 0
    for the shared files."""
    found = _RANK_IN_NAME.search(rel.rsplit("/", 1)[-1])
    return int(found.group(1)) % world if found else 0


def hash_file(path: Path, sync: bool = False) -> dict:
    """{"bytes", "sha256"} of `path`, read in 8 MiB chunks; `sync`: fsync it too (a save makes
    the files durable before the folder becomes current)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": n, ALGORITHM: h.hexdigest()}


def hash_files(step_dir: Path, rels: list[str], threads: int = 1, sync: bool = False) -> dict[str, dict]:
    """{rel: hash_file(step_dir / rel)}; hashlib releases the GIL, so threads run in parallel."""
    step_dir = Path(step_dir)
    if threads <= 1 or len(rels) <= 1:
        return {rel: hash_file(step_dir / rel, sync) for rel in rels}
    with ThreadPoolExecutor(min(threads, len(rels))) as pool:
        return dict(zip(rels, pool.map(lambda rel: hash_file(step_dir / rel, sync), rels)))


def write_manifest(step_dir: Path, entries: dict[str, dict]) -> None:
    body = {"manifest": MANIFEST_VERSION, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
    write_atomic(Path(step_dir) / MANIFEST, json.dumps(body, indent=1))


def read_manifest(step_dir: Path) -> dict[str, dict] | None:
    """The manifest's {rel: {"bytes", "sha256"}}, or None when the folder has none;
    DamagedCheckpointError when it is unreadable or not a manifest."""
    path = Path(step_dir) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DamagedCheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or damaged") from None
    files = body.get("files") if isinstance(body, dict) else None
    version = body.get("manifest") if isinstance(body, dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise CheckpointFormatError(f"{path} is manifest version {version}; this bld_scale reads version "
                                    f"{MANIFEST_VERSION}. Use the bld_scale version that wrote it (a newer one)")
    if (not isinstance(files, dict) or body.get("algorithm") != ALGORITHM or META not in files
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get(ALGORITHM), str)
                       for e in files.values())):
        raise DamagedCheckpointError(f"{path}: not a {ALGORITHM} manifest of a checkpoint (it should list "
                                     f"{META} and every file's bytes and {ALGORITHM}); the file is damaged")
    return files


def _size_problem(rel: str, actual: int, expected: int) -> str:
    how = "truncated" if actual < expected else "longer than saved"
    return f"{rel}: {actual} bytes, the manifest says {expected} ({how})"


def size_problems(step_dir: Path, entries: dict[str, dict]) -> list[str]:
    """Files of `entries` that are missing or of another size (stat only: instant at any scale)."""
    problems = []
    for rel, entry in entries.items():
        path = Path(step_dir) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(_size_problem(rel, path.stat().st_size, entry["bytes"]))
    return problems


def _hash_or_problem(path: Path) -> dict | str:
    try:
        return hash_file(path)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"


def content_problems(step_dir: Path, entries: dict[str, dict], threads: int = 1) -> list[str]:
    """Files of `entries` whose content (size and SHA-256, read now) differs from the manifest."""
    rels = list(entries)
    paths = [Path(step_dir) / rel for rel in rels]
    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(min(threads, len(paths))) as pool:
            found = list(pool.map(_hash_or_problem, paths))
    else:
        found = [_hash_or_problem(p) for p in paths]
    problems = []
    for rel, got in zip(rels, found):
        want = entries[rel]
        if isinstance(got, str):
            problems.append(f"{rel}: {'missing' if not (Path(step_dir) / rel).exists() else got}")
        elif got["bytes"] != want["bytes"]:
            problems.append(_size_problem(rel, got["bytes"], want["bytes"]))
        elif got[ALGORITHM] != want[ALGORITHM]:
            problems.append(f"{rel}: content differs from the manifest ({ALGORITHM} {got[ALGORITHM][:12]}..., "
                            f"saved {want[ALGORITHM][:12]}...)")
    return problems
