"""Why a run may not continue from its checkpoint, or a tool may not read one."""
from __future__ import annotations


class ResumeError(RuntimeError):
    """A checkpoint that must not be resumed with this run's recipe; the message says why and what to do."""


class CheckpointFormatError(ResumeError):
    """meta.json of a format this version cannot read (written by a newer bld_scale, or not ours)."""


class DamagedCheckpointError(ResumeError):
    """A checkpoint whose files are missing, truncated, unreadable or differ from its manifest; the
    message names the file and the problem."""
