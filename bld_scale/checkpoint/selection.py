"""Which checkpoint a resume loads: the one `latest` names if it verifies, else the newest one
before it that does, with a message saying which and why.

- `latest` names a whole checkpoint: that one (also when newer step folders exist: `latest` may
  have been pointed back by hand).
- `latest` names a damaged one (a file missing, truncated, or unlike its manifest; meta.json
  unreadable): the newest earlier checkpoint that verifies; the damaged folder is renamed
  `step-N.bad` (kept for inspection, out of the way of saves and of later choices).
- `latest` names a folder that is not there: the newest earlier checkpoint that verifies.
- `latest` is missing (deleted by hand; a save never leaves a step folder without one) or not a
  step name: the newest checkpoint that verifies. Step folders appear only by an atomic rename
  after every file and the manifest are written, and each one is verified before it is chosen,
  so the newest whole one is the run's last save; resuming it is what the run would have done.
- None verifies: refused, naming each folder and its problem (nothing is changed).

`latest` is then pointed at the chosen folder. A checkpoint of a newer format is not damaged: it
is refused (CheckpointFormatError), not passed over.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bld_scale.checkpoint.errors import ResumeError
from bld_scale.checkpoint.files import BAD_SUFFIX, LATEST, is_step_name, read_latest, step_folders, step_of
from bld_scale.checkpoint.verify import Verdict

Verify = Callable[[Path], Verdict]


@dataclass(frozen=True)
class Choice:
    """The checkpoint to resume (None: there is none), and what choosing it changes."""
    step_dir: Path | None
    set_aside: tuple[Path, ...] = ()  # damaged folders passed over: renamed step-N.bad
    point_latest: bool = False  # write `latest` = step_dir's name
    notes: tuple[str, ...] = ()  # for the log


def _candidates(root: Path, named: str | None) -> tuple[list[Path], str | None]:
    """The folders to try, newest first, and why `latest` itself is not simply taken (None: it is)."""
    folders = step_folders(root)
    pointer = root / LATEST
    there = ", ".join(f.name for f in folders) or "none"
    if named is None:
        return folders[::-1], f"{pointer} is missing (step folders: {there})"
    if not is_step_name(named):
        return folders[::-1], f"{pointer} holds {named!r}, not a step folder's name (step folders: {there})"
    below = [f for f in folders[::-1] if step_of(f) < int(named[len("step-"):])]
    if (root / named).is_dir():
        return [root / named] + below, None
    return below, f"{pointer} names {named}, which is missing"


def choose_checkpoint(root: str | Path, verify: Verify) -> Choice:
    """The checkpoint under `root` to resume; ResumeError when there are some but none verifies."""
    root = Path(root)
    named = read_latest(root)
    candidates, why = _candidates(root, named)
    if named is None and not candidates:
        return Choice(None)  # no checkpoint was ever completed here
    rejected: list[Verdict] = []
    for folder in candidates:
        verdict = verify(folder)
        if not verdict.ok:
            rejected.append(verdict)
            continue
        notes = [f"checkpoint {folder.name} verified ({verdict.checked})"]
        if why or rejected:
            reasons = ([why] if why else []) + [f"checkpoint {v.step_dir} is damaged: " + "; ".join(v.problems)
                                               for v in rejected]
            which = "newest" if named is None or not is_step_name(named) else "newest earlier"
            moved = "".join(f"; {v.step_dir.name} is moved aside to {v.step_dir.name}{BAD_SUFFIX} (delete it "
                            "once inspected)" for v in rejected if v.step_dir.is_dir())
            notes.insert(0, f"{'; '.join(reasons)}. Resuming from {folder.name}, the {which} checkpoint that "
                            f"verifies{moved}; {LATEST} now names {folder.name}")
        return Choice(folder, tuple(v.step_dir for v in rejected if v.step_dir.is_dir()),
                      point_latest=folder.name != named, notes=tuple(notes))
    found = ([why] if why else []) + [v.describe() for v in rejected]
    raise ResumeError(
        f"no checkpoint in {root} can be resumed:\n  - " + "\n  - ".join(found) + "\n"
        "Restore the damaged files (or a step folder), or start over: --fresh discards the run and its "
        "checkpoints, or choose another output_dir")
