"""What must not change between a checkpoint and the run resuming it, and how to tell.

The teacher is never saved: only its identity (path and a content fingerprint), checked on resume
together with the tokenizers, the student's config and byte head, and the data order.

Fingerprint rules (the rule a fingerprint was made with is saved beside it, "fingerprint_rule"):
- 2 (this version): the files that define a model or tokenizer (`MODEL_FILES`): weights, configs,
  tokenizer files. A README, a license or a training log added to the folder changes nothing.
- 1 (checkpoints saved before the rule was recorded): every file of the folder. Such a checkpoint
  is compared like with like: rule 1 is recomputed on this run's folder, over all its files and,
  failing that, over all but some of its non-model files (the folder may have gained a README
  since); any match is a match: equal hashes mean the files hashed now are those hashed then.
"""
from __future__ import annotations

import fnmatch
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


FINGERPRINT_RULE = 2
RULE_1_SUBSETS = 5  # rule-1 comparisons try leaving out any of up to this many non-model files
# What defines a model or a tokenizer: weights (and their shard indexes), configs, tokenizer files.
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json", "config.json",
               "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.*", "*.tiktoken", "*.model")


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES)


def _folder_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        _hash_file(f, h)
    return h.hexdigest()[:16]


def fingerprint(path: str | os.PathLike, rule: int = FINGERPRINT_RULE) -> str:
    """Content fingerprint of a model or tokenizer folder (or one file), independent of its path.

    Rule 2: the folder's model files (`MODEL_FILES`; every file when none matches, an unusual
    layout); rule 1: every file. Not recursive, hidden files skipped. Each file contributes its
    name and size; files up to 32 MiB their whole content, larger ones (weight shards) their first
    and last 4 MiB. A different checkpoint of the same architecture changes both the safetensors
    header region and the tensors at the tail, so it is caught without reading 16 GB per resume.
    """
    p = Path(path)
    if p.is_file():
        return _digest([p])
    files = _folder_files(p)
    if rule >= 2:
        files = [f for f in files if is_model_file(f.name)] or files
    return _digest(files)


class _Parts:
    """Collects what `_hash_file` feeds a hash, so that several file sets hash without rereading."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def update(self, data: bytes) -> None:
        self.chunks.append(bytes(data))


def _rule_1_matches(path: str | os.PathLike, saved: str) -> bool:
    """Whether rule 1 over some of this folder's files gives `saved`: all of them, or all but some
    files that do not define the model (a README added since; up to 2**RULE_1_SUBSETS sets tried).
    Sound whichever set matches: equal hashes mean the files hashed now are the files hashed then,
    model files included."""
    p = Path(path)
    files = [p] if p.is_file() else _folder_files(p)
    parts = {}
    for f in files:
        collect = _Parts()
        _hash_file(f, collect)
        parts[f] = collect.chunks
    others = [f for f in files if not is_model_file(f.name)] if not p.is_file() else []
    if len(others) > RULE_1_SUBSETS:
        leave_out_sets = [[], others]
    else:
        leave_out_sets = [[f for i, f in enumerate(others) if mask >> i & 1] for mask in range(2 ** len(others))]
    for leave_out in leave_out_sets:
        h = hashlib.sha256()
        for f in files:
            if f not in leave_out:
                for chunk in parts[f]:
                    h.update(chunk)
        if h.hexdigest()[:16] == saved:
            return True
    return False


def same_content(saved: dict, current: dict) -> bool:
    """Whether `current` (this run's {"path", "fingerprint", "fingerprint_rule"}) has the content a
    checkpoint recorded as `saved`, compared under the rule `saved` was made with."""
    rule = saved.get("fingerprint_rule", 1)
    if rule == current.get("fingerprint_rule", FINGERPRINT_RULE):
        return saved.get("fingerprint") == current["fingerprint"]
    if rule == 1 and Path(current["path"]).exists():
        return _rule_1_matches(current["path"], saved.get("fingerprint"))
    return False


def run_identity(recipe, student_config: dict) -> dict:
    """What must not change between a checkpoint and the run resuming it."""
    s = recipe.student
    teacher_tok = recipe.teacher.tokenizer or recipe.teacher.path

    def identify(path: str) -> dict:
        return {"path": path, "fingerprint": fingerprint(path), "fingerprint_rule": FINGERPRINT_RULE}

    return {
        "teacher": identify(recipe.teacher.path),
        "teacher_tokenizer": identify(teacher_tok),
        "student_tokenizer": identify(s.tokenizer),
        "student_model": {"config": student_config, "head": s.head, "K": s.K,
                          "head_hidden_size": s.head_hidden_size, "head_num_layers": s.head_num_layers},
        "data": {"seed": recipe.seed, "window_bytes": recipe.data.window_bytes,
                 "normalize": recipe.data.normalize},
    }


# What a checkpoint made before a `data` identity key existed had in effect: compared as such.
DATA_DEFAULTS = {"normalize": "none"}


def identity_problems(saved: dict, current: dict) -> list[str]:
    """Human-readable reasons why `current` may not resume a checkpoint made with `saved`."""
    problems = []
    saved = saved if isinstance(saved, dict) else {}
    names = {"teacher": "teacher (teacher.path)", "teacher_tokenizer": "teacher tokenizer",
             "student_tokenizer": "student tokenizer (student.tokenizer)"}
    for key, what in names.items():
        a, b = saved.get(key), current[key]
        a = a if isinstance(a, dict) else {}
        if not same_content(a, b):
            rule = a.get("fingerprint_rule", 1)
            how = "" if rule == b.get("fingerprint_rule", FINGERPRINT_RULE) else \
                f"; the checkpoint's is of fingerprint rule {rule} (every file), recomputed so here: no match"
            problems.append(f"{what}: the checkpoint was made with {a.get('path')} (fingerprint "
                            f"{a.get('fingerprint')}), this run has {b['path']} (fingerprint {b['fingerprint']}{how})")
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
    a, b = {**DATA_DEFAULTS, **saved.get("data", {})}, current["data"]
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        problems.append(f"data (seed, data.window_bytes, data.normalize): checkpoint "
                        f"{ {k: a.get(k) for k in keys} }, this run { {k: b.get(k) for k in keys} }; the "
                        "saved data position would point at other windows, or the text would differ")
    return problems
