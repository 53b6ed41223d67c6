"""Copies of the demo teacher folder with a tokenizer that is not the model's, for the tests of
bld_scale/train/teacher_tokenizer.py (unit and with real ranks)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR


def copy_with_student_tokenizer(dst: Path) -> Path:
    """The demo teacher folder with the student's tokenizer files over its own."""
    shutil.copytree(TEACHER_DIR, dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).unlink()
    for f in STUDENT_TOKENIZER_DIR.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def copy_with_shuffled_ids(dst: Path, seed: int = 0) -> Path:
    """The demo teacher folder whose BPE ids are permuted (all but <|endoftext|> = 0): same size,
    same special ids, same strings; only which id each string gets differs."""
    shutil.copytree(TEACHER_DIR, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, i in vocab.items() if i != 0]
    ids = [vocab[t] for t in tokens]
    random.Random(seed).shuffle(ids)
    spec["model"]["vocab"] = {**{t: 0 for t, i in vocab.items() if i == 0}, **dict(zip(tokens, ids))}
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst
