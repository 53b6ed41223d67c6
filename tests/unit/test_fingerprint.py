"""What counts as the same teacher or tokenizer on resume: the files that define it (fingerprint
rule 2), and checkpoints saved under the earlier every-file rule (1) compared like with like."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from bld_scale.checkpoint import fingerprint, identity_problems, run_identity

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "bld_scale" / "assets" / "demo" / "teacher"


def rule_1_fingerprint(folder: Path) -> str:
    """bld_scale's fingerprint before rule 2, spelled out from the code that computed it (not
    derived from the code under test): every non-hidden file, sorted by name; name and size, then
    the whole content up to 32 MiB, else the first and last 4 MiB; SHA-256, 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode())
        h.update(data if len(data) <= 32 << 20 else data[:4 << 20] + data[-(4 << 20):])
    return h.hexdigest()[:16]


@pytest.fixture
def teacher(tmp_path) -> Path:
    return Path(shutil.copytree(TEACHER, tmp_path / "teacher"))


@pytest.fixture(scope="module")
def recipe():
    from bld_scale.config import load_recipe

    return load_recipe(REPO / "launch" / "recipes" / "demo.yaml")


def _identity(recipe, teacher: Path) -> dict:
    from bld_scale.train.setup import student_config_dict

    recipe.teacher.path = str(teacher)
    recipe.teacher.tokenizer = str(teacher)
    return run_identity(recipe, student_config_dict(recipe))


def _as_saved_before_rule_2(identity: dict, folder: Path) -> dict:
    """An identity as a checkpoint saved before rule 2 recorded it: rule-1 fingerprints, no rule."""
    old = {k: dict(v) for k, v in identity.items()}
    for key in ("teacher", "teacher_tokenizer"):
        old[key] = {"path": str(folder), "fingerprint": rule_1_fingerprint(folder)}
    return old


@pytest.mark.parametrize("name", ["README.md", "LICENSE", "TRAINING.json", "notes.txt", "train_log.jsonl"])
def test_a_file_that_does_not_define_the_model_changes_nothing(teacher, name):
    before = fingerprint(teacher)
    (teacher / name).write_text("# about this model\n")
    assert fingerprint(teacher) == before


def test_rule_1_is_the_earlier_every_file_fingerprint(teacher):
    assert fingerprint(teacher, rule=1) == rule_1_fingerprint(teacher)
    before = fingerprint(teacher, rule=1)
    (teacher / "README.md").write_text("x")
    assert fingerprint(teacher, rule=1) == rule_1_fingerprint(teacher) != before


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                  "model.safetensors"])
def test_a_file_that_defines_the_model_changes_the_fingerprint(teacher, name):
    before = fingerprint(teacher)
    with open(teacher / name, "r+b") as f:  # same size, one byte at the end
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert fingerprint(teacher) != before


@pytest.mark.parametrize("name", ["tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                                  "cl100k.tiktoken", "model-00002-of-00002.safetensors",
                                  "model.safetensors.index.json", "pytorch_model.bin", "added_tokens.json"])
def test_weights_and_tokenizer_files_count(teacher, name):
    before = fingerprint(teacher)
    (teacher / name).write_text("x")
    assert fingerprint(teacher) != before


def test_a_readme_added_to_the_teacher_does_not_refuse_the_resume(recipe, teacher):
    saved = _identity(recipe, teacher)
    (teacher / "README.md").write_text("# teacher\n")
    assert identity_problems(saved, _identity(recipe, teacher)) == []


def test_a_checkpoint_from_before_rule_2_is_compared_under_rule_1(recipe, teacher):
    current = _identity(recipe, teacher)
    old = _as_saved_before_rule_2(current, teacher)
    assert old["teacher"]["fingerprint"] != current["teacher"]["fingerprint"]  # the rules differ here
    assert identity_problems(old, current) == []
    (teacher / "README.md").write_text("# added after the checkpoint\n")
    assert identity_problems(old, _identity(recipe, teacher)) == []  # its model files are those hashed then
    with open(teacher / "model.safetensors", "r+b") as f:  # other weights: still refused
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    problems = identity_problems(old, _identity(recipe, teacher))
    assert [p.split(":")[0] for p in problems] == ["teacher (teacher.path)", "teacher tokenizer"]  # one folder
    assert "fingerprint rule 1 (every file), recomputed so here: no match" in problems[0]


def test_data_identity_of_an_older_checkpoint_reads_as_the_defaults():
    from bld_scale.checkpoint.identity import identity_problems

    def ident(data):
        fp = {"path": "p", "fingerprint": "f", "fingerprint_rule": 2}
        return {"teacher": fp, "teacher_tokenizer": fp, "student_tokenizer": fp, "student_model": {}, "data": data}

    old = ident({"seed": 0, "window_bytes": 2048})  # saved before data.normalize existed
    assert identity_problems(old, ident({"seed": 0, "window_bytes": 2048, "normalize": "none"})) == []
    problems = identity_problems(old, ident({"seed": 0, "window_bytes": 2048, "normalize": "nfkc"}))
    assert len(problems) == 1 and "normalize" in problems[0] and "nfkc" in problems[0]
