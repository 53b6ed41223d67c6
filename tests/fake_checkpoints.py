"""Checkpoints made by the real `CheckpointManager.save` (one rank, no DeepSpeed) with a stand-in
engine that writes fake shards (random bytes) where DeepSpeed writes its own: for tests of what
reads, verifies and chooses checkpoints, which never look inside a shard."""
from __future__ import annotations

import os
from pathlib import Path

from bld_scale.checkpoint import CheckpointManager

SHARD = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's optimizer shard, 5000 bytes
SHARD_BYTES = 5000


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes for two ranks, as random bytes, and the
    recovery script at the top of the folder."""

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        for rank in range(2):
            for kind, size in (("model_states", 700), ("optim_states", SHARD_BYTES)):
                path = Path(folder) / tag / f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(size))
        (Path(folder) / "zero_to_fp32.py").write_text("# recovery script\n")


class FakeState:
    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"rng": {"python": self.step}, "step": self.step, "data": {"position": 4 * self.step, "seed": 0},
                "log_sums": {}, "log_window_seconds": 0.0, "evals_before": {"teacher": None, "student_bpb": None}}


def manager(out: Path, keep: int = 5) -> CheckpointManager:
    return CheckpointManager(Path(out) / "checkpoints", rank=0, world=1, keep=keep, interval=3)


def save_fake(out: Path, step: int, identity: dict, metrics_bytes: int = 0, max_steps: int = 20) -> Path:
    """Checkpoint `step` under `out/checkpoints` (made current); returns its folder."""
    run = {"identity": identity, "recipe": {"train": {"max_steps": max_steps}}, "student_parameters": 1000,
           "metrics_bytes": metrics_bytes}
    return manager(out).save(step, FakeEngine(), FakeState(step), run,
                             lambda folder: (folder.mkdir(), (folder / "config.json").write_text("{}")))


def truncate(path: Path, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def demo_identity() -> dict:
    """The run identity of the shipped demo recipe (what a checkpoint of the demo records)."""
    from pathlib import Path

    from bld_scale.checkpoint import run_identity
    from bld_scale.config import load_recipe
    from bld_scale.train.setup import student_config_dict

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo.yaml")
    return run_identity(recipe, student_config_dict(recipe))
