"""What must not change between a checkpoint and the run resuming it, and how to tell.

The teacher is never saved: only its identity (path and a content fingerprint), checked on resume
together with the tokenizers, the student's config and byte head, and the data order.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_HASH_LIMIT = 32 << 20  # files up to 32 MiB are hashed whole
EDGE_BYTES = 4 << 20  # larger ones: size + first and last 4 MiB (safetensors headers come first)


def _hash_file(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))


def fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a model or tokenizer folder (or one file), independent of its path.

    Every regular file in the folder (not recursive, hidden files skipped) contributes its name
    and size; files up to 32 MiB their whole content, larger ones (weight shards) their first and
    last 4 MiB. A different checkpoint of the same architecture changes both the safetensors
    header region and the tensors at the tail, so it is caught without reading 16 GB per resume.
    """
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    for f in files:
        _hash_file(f, h)
    return h.hexdigest()[:16]


def run_identity(recipe, student_config: dict) -> dict:
    """What must not change between a checkpoint and the run resuming it."""
    s = recipe.student
    teacher_tok = recipe.teacher.tokenizer or recipe.teacher.path
    return {
        "teacher": {"path": recipe.teacher.path, "fingerprint": fingerprint(recipe.teacher.path)},
        "teacher_tokenizer": {"path": teacher_tok, "fingerprint": fingerprint(teacher_tok)},
        "student_tokenizer": {"path": s.tokenizer, "fingerprint": fingerprint(s.tokenizer)},
        "student_model": {"config": student_config, "head": s.head, "K": s.K,
                          "head_hidden_size": s.head_hidden_size, "head_num_layers": s.head_num_layers},
        "data": {"seed": recipe.seed, "window_bytes": recipe.data.window_bytes},
    }


def identity_problems(saved: dict, current: dict) -> list[str]:
    """Human-readable reasons why `current` may not resume a checkpoint made with `saved`."""
    problems = []
    names = {"teacher": "teacher (teacher.path)", "teacher_tokenizer": "teacher tokenizer",
             "student_tokenizer": "student tokenizer (student.tokenizer)"}
    for key, what in names.items():
        a, b = saved.get(key, {}), current[key]
        if a.get("fingerprint") != b["fingerprint"]:
            problems.append(f"{what}: the checkpoint was made with {a.get('path')} (fingerprint "
                            f"{a.get('fingerprint')}), this run has {b['path']} (fingerprint {b['fingerprint']})")
    a, b = saved.get("student_model", {}), current["student_model"]
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = []
        for k in keys:
            if k == "config" and isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                ck = sorted(c for c in set(a[k]) | set(b[k]) if a[k].get(c) != b[k].get(c))
                detail.append("config " + ", ".join(f"{c}: {a[k].get(c)!r} -> {b[k].get(c)!r}" for c in ck))
            else:
                detail.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
        problems.append("student model (student.config / head): " + "; ".join(detail))
    a, b = saved.get("data", {}), current["data"]
    if a != b:
        problems.append(f"data order (seed, data.window_bytes): checkpoint {a}, this run {b}; the saved "
                        "data position would point at other windows")
    return problems
