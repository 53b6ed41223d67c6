"""Verifying checkpoints for a resume with every rank: rank 0 decides, each rank hashes its share.

Rank 0 runs the run-directory policy (`run_directory.decide`), which verifies each checkpoint it
considers (`checkpoint.verify`): the stat-level checks on rank 0 alone, the SHA-256 of the files
split by `manifest.owner`, so that every rank re-reads the shards it is about to load. The other
ranks wait in `serve()`, answering each request, until rank 0 sends the outcome (resume, start,
refuse), which `serve` returns. With one rank nothing is sent.
"""
from __future__ import annotations

import os
from pathlib import Path

from bld_scale.checkpoint.manifest import content_problems, owner


def _threads(world: int) -> int:
    """Hashing threads for one rank: the node's cores shared by its ranks (at least 1, at most 4)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, local)))


class RankVerification:
    """The collective content check of a resume (see the module's docstring)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.threads = _threads(world)

    def _broadcast(self, message: dict | None) -> dict:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _my_share(self, step_dir: Path, entries: dict) -> list[str]:
        mine = {rel: e for rel, e in entries.items() if owner(rel, self.world) == self.rank}
        problems = content_problems(step_dir, mine, self.threads)
        if self.world == 1:
            return problems
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, problems)
        return sorted(p for share in gathered for p in share)

    def hasher(self, step_dir: Path, entries: dict) -> list[str]:
        """Rank 0 (a `verify.Hasher`): every rank checks the files it owns; all problems, sorted."""
        if self.world > 1:
            self._broadcast({"verify": str(step_dir), "entries": entries})
        return self._my_share(step_dir, entries)

    def serve(self) -> dict:
        """Ranks > 0: answer rank 0's requests; returns the outcome it sends last."""
        while True:
            message = self._broadcast(None)
            if "outcome" in message:
                return message["outcome"]
            self._my_share(Path(message["verify"]), message["entries"])

    def finish(self, outcome: dict) -> dict:
        """Rank 0: end the other ranks' `serve` with `outcome`."""
        if self.world > 1:
            self._broadcast({"outcome": outcome})
        return outcome
