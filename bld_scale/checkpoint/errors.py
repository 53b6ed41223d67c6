"""Why a run may not continue from its checkpoint."""
from __future__ import annotations


class ResumeError(RuntimeError):
    """A checkpoint that must not be resumed with this run's recipe; the message says why and what to do."""


class CheckpointFormatError(ResumeError):
    """meta.json of a format this version cannot read (written by a newer bld_scale, or not ours)."""
