"""The shipped demo corpus: 42 works of Shakespeare (public domain; see bld_scale/assets/NOTICE).

Held-out works are kept out of every training run by file, so held-out bits per byte are measured
on text no model saw: `HELDOUT_WORKS`.
"""
from __future__ import annotations

import tarfile
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "assets"
ARCHIVE = DATA_DIR / "shakespeare.tar.xz"
HELDOUT_WORKS = ("hamlet", "tempest", "twelfth_night")


@lru_cache(maxsize=1)
def _all_works() -> dict[str, str]:
    works = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt"):
                name = Path(member.name).name[: -len("_gut.txt")]
                works[name] = archive.extractfile(member).read().decode("utf-8")
    return dict(sorted(works.items()))


def load_works(split: str = "train") -> dict[str, str]:
    """Works by name: split 'train' (all but the held-out ones), 'heldout' or 'all'."""
    works = _all_works()
    if split == "all":
        return dict(works)
    if split == "heldout":
        return {k: v for k, v in works.items() if k in HELDOUT_WORKS}
    if split == "train":
        return {k: v for k, v in works.items() if k not in HELDOUT_WORKS}
    raise ValueError(f"unknown corpus split {split!r}; choose 'train', 'heldout' or 'all'")
