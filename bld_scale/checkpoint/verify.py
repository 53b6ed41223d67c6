"""Is a checkpoint folder whole? Checked before a resume loads it and before a tool reads it.

With a manifest (`checkpoint.manifest`): every listed file is there with its size (stat only),
then its SHA-256 matches (the costly part, done by a `Hasher`: threads in one process for the
tools, split over the ranks for a resume, `checkpoint.rank_verification`), then meta.json reads.
Without one (saved before manifests existed, its meta.json has no "manifest" key): meta.json
reads and every `.pt` file is a whole archive (torch.save writes zip files, whose directory is at
the end: a truncated one lacks it); contents cannot be checked.

Damage is returned as problems naming the file; a meta.json of a format this version does not know
(a newer bld_scale's) raises CheckpointFormatError: that checkpoint is not damaged, and passing
over it to an older one would be wrong.
"""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bld_scale.checkpoint.errors import DamagedCheckpointError
from bld_scale.checkpoint.files import MANIFEST, META
from bld_scale.checkpoint.manifest import ALGORITHM, content_problems, read_manifest, size_problems
from bld_scale.checkpoint.meta import read_meta

Hasher = Callable[[Path, dict], list]  # (step_dir, manifest entries) -> content problems


@dataclass
class Verdict:
    """What verifying one checkpoint found: problems (empty: it may be loaded) and what was checked."""
    step_dir: Path
    problems: list[str] = field(default_factory=list)
    checked: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """One line: the folder and its problems."""
        return f"{self.step_dir.name}: " + "; ".join(self.problems)


def tool_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def local_hasher(threads: int = 1) -> Hasher:
    return lambda step_dir, entries: content_problems(step_dir, entries, threads)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def legacy_problems(step_dir: Path) -> list[str]:
    """A checkpoint without a manifest: the .pt files (torch zip archives) must be whole."""
    problems = []
    for path in sorted(Path(step_dir).rglob("*.pt")):
        if not zipfile.is_zipfile(path):
            problems.append(f"{path.relative_to(step_dir).as_posix()}: not a whole torch archive "
                            f"({path.stat().st_size} bytes; truncated or damaged)")
    return problems


def verify_checkpoint(step_dir: Path, hasher: Hasher | None = None, contents: bool = True) -> Verdict:
    """Check `step_dir` (see the module's docstring); `contents=False` stops after the sizes."""
    step_dir = Path(step_dir)
    verdict = Verdict(step_dir)
    if not step_dir.is_dir():
        verdict.problems.append("missing")
        return verdict
    try:
        entries = read_manifest(step_dir)
    except DamagedCheckpointError as err:
        verdict.problems.append(_relative(err, step_dir / MANIFEST))
        return verdict
    if entries is None:
        return _verify_legacy(verdict)
    verdict.problems += size_problems(step_dir, entries)
    total = sum(e["bytes"] for e in entries.values())
    if verdict.problems or not contents:
        verdict.checked = f"{len(entries)} files, {_mb(total)}: sizes only"
        return verdict
    t0 = time.perf_counter()
    verdict.problems += (hasher or local_hasher())(step_dir, entries)
    verdict.checked = f"{len(entries)} files, {_mb(total)}, {ALGORITHM} in {time.perf_counter() - t0:.1f} s"
    if verdict.ok:
        _read_meta_into(verdict)
    return verdict


def _relative(err: Exception, path: Path) -> str:
    """The error's message with the folder left out of the file's name (the verdict names it)."""
    text = str(err)
    return path.name + text[len(str(path)):] if text.startswith(str(path)) else f"{path.name}: {text}"


def _read_meta_into(verdict: Verdict) -> dict | None:
    try:
        return read_meta(verdict.step_dir)  # CheckpointFormatError (a newer format) propagates
    except DamagedCheckpointError as err:
        verdict.problems.append(_relative(err, verdict.step_dir / META))
        return None


def _verify_legacy(verdict: Verdict) -> Verdict:
    meta = _read_meta_into(verdict)
    if meta is None:
        return verdict
    if meta.get("manifest"):
        verdict.problems.append(f"{MANIFEST}: missing (its {META} says one was written); the folder is incomplete")
        return verdict
    verdict.problems += legacy_problems(verdict.step_dir)
    verdict.checked = (f"no {MANIFEST} (saved before bld_scale wrote one): {META} reads and the .pt files "
                       "are whole archives; their contents cannot be checked")
    return verdict


def require_whole(step_dir: Path, contents: bool = True, threads: int | None = None) -> Verdict:
    """For the tools: the verdict, or DamagedCheckpointError naming the files and problems."""
    verdict = verify_checkpoint(step_dir, local_hasher(threads or tool_threads()), contents)
    if not verdict.ok:
        raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: " + "; ".join(verdict.problems))
    return verdict
