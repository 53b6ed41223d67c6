"""Checkpoints of a run: when and what to save, resume or not, preemption, identity checks.

Modules, one concern each (none imports torch at import time, so `launch/distill.py` can install
the stop handlers first thing):
- `manager`: CheckpointManager, saves/loads the student engine and the training state; when to save
- `run_directory`: resume / fresh / refuse for an output_dir (and what that deletes or cuts)
- `preemption`: StopRequest, install_stop_handlers (SIGTERM / SIGUSR1 / stop file -> a flag)
- `identity`: fingerprint, run_identity, identity_problems
- `rng`: rng_state, set_rng_state
- `selection`: which checkpoint a resume loads (`latest`'s, else the newest earlier one that verifies)
- `manifest`: manifest.json, every file's size and SHA-256 (written by `manager` at each save)
- `verify`: verify_checkpoint / require_whole (is a checkpoint folder whole?)
- `rank_verification`: the resume's verification split over the ranks
- `meta`: meta.json's format (FORMAT_VERSION, read_meta; older formats converted)
- `files`: the layout's names, write_atomic, resolve_checkpoint, folder_bytes
- `errors`: ResumeError, CheckpointFormatError, DamagedCheckpointError
Details: docs/checkpointing.md.
"""
from bld_scale.checkpoint.errors import CheckpointFormatError, DamagedCheckpointError, ResumeError
from bld_scale.checkpoint.files import (DS_TAG, LATEST, MANIFEST, META, STUDENT_FILES, folder_bytes,
                                        resolve_checkpoint, write_atomic)
from bld_scale.checkpoint.identity import fingerprint, identity_problems, run_identity
from bld_scale.checkpoint.manager import CheckpointManager
from bld_scale.checkpoint.meta import FORMAT_VERSION, read_meta
from bld_scale.checkpoint.preemption import StopRequest, install_stop_handlers
from bld_scale.checkpoint.rng import rng_state, set_rng_state
from bld_scale.checkpoint.run_directory import (RunPlan, carry_out, cut_metrics, decide, metrics_bytes,
                                                prepare_run_directory)
from bld_scale.checkpoint.verify import Verdict, require_whole, verify_checkpoint

__all__ = ["CheckpointFormatError", "CheckpointManager", "DS_TAG", "DamagedCheckpointError", "FORMAT_VERSION",
           "LATEST", "MANIFEST", "META", "ResumeError", "RunPlan", "STUDENT_FILES", "StopRequest", "Verdict",
           "carry_out", "cut_metrics", "decide", "fingerprint", "folder_bytes", "identity_problems",
           "install_stop_handlers", "metrics_bytes", "prepare_run_directory", "read_meta", "require_whole",
           "resolve_checkpoint", "rng_state", "run_identity", "set_rng_state", "verify_checkpoint", "write_atomic"]
