"""The teacher-tokenizer checks (bld_scale/train/teacher_tokenizer.py) on the shipped demo assets:
the demo's own pairing passes every check; the student's tokenizer given as the teacher's (as
teacher.tokenizer, or copied over the teacher folder's files) and a teacher folder whose tokenizer
ids are shuffled are refused, each by the checks that can see it."""
from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, AutoTokenizer

from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR
from bld_scale.train.setup import setup_tokenizers
from bld_scale.train.teacher_tokenizer import (TokenizerError, check_beats_uniform, check_teacher_tokenizer,
                                               eval_token_counts, model_special_ids, rows_problem,
                                               special_token_problems, uniform_bpb, unused_rows_allowed,
                                               vocabulary_problem)
from teacher_copies import copy_with_shuffled_ids, copy_with_student_tokenizer

ROWS = 4096  # the demo teacher's embedding rows (config.json vocab_size)


def _teacher(path, tokenizer=None):
    return SimpleNamespace(path=str(path), tokenizer=str(tokenizer) if tokenizer else None, bos_token=None)


def _config(path=TEACHER_DIR):
    return AutoConfig.from_pretrained(path)


# ------------------------------------------------------------------------------------- (a) sizes
def test_padding_rule():
    assert unused_rows_allowed(151_936) == 9_496 and unused_rows_allowed(1000) == 128
    assert rows_problem(151_646, 151_936, "x") is None  # Qwen2: 290 padding rows
    assert rows_problem(4096, 4096, "x") is None
    assert rows_problem(4096 - 256, 4096, "x") is None  # exactly rows / 16
    assert "leaving 257 rows unread" in rows_problem(4096 - 257, 4096, "x")
    with pytest.raises(TokenizerError, match="has 4097 ids but the teacher model embeds only 4096"):
        rows_problem(4097, 4096, "x")


# ------------------------------------------------------------------------------------- (b) special ids
def test_special_ids_come_from_config_and_generation_config(tmp_path):
    assert model_special_ids(_config(), str(TEACHER_DIR)) == {"bos": {0}, "eos": {0}}
    folder = tmp_path / "t"
    shutil.copytree(TEACHER_DIR, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert model_special_ids(_config(folder), str(folder))["eos"] == {0, 7}
    tok = SimpleNamespace(bos_token_id=None, eos_token_id=7, eos_token="<x>")
    assert special_token_problems(tok, model_special_ids(_config(folder), str(folder))) == []


def test_student_special_ids_do_not_match_the_teacher_config():
    student = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    problems = special_token_problems(student, model_special_ids(_config(), str(TEACHER_DIR)))
    assert problems == ["its BOS token '<s>' is id 1, the model's bos_token_id is 0",
                        "its EOS token '</s>' is id 2, the model's eos_token_id is 0"]
    teacher = AutoTokenizer.from_pretrained(TEACHER_DIR)
    assert special_token_problems(teacher, model_special_ids(_config(), str(TEACHER_DIR))) == []


# ------------------------------------------------------------------------------------- (c) same vocabulary
def test_vocabulary_comparison():
    teacher = AutoTokenizer.from_pretrained(TEACHER_DIR)
    student = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    assert vocabulary_problem(teacher, AutoTokenizer.from_pretrained(TEACHER_DIR)) is None
    problem = vocabulary_problem(student, teacher)
    shared = sum(1 for t, i in student.get_vocab().items() if teacher.get_vocab().get(t) == i)
    assert problem == f"only {shared} of its 2048 tokens have the same id in the model folder's tokenizer (4096 tokens)"
    assert shared < 0.99 * 2048


def test_a_separate_copy_of_the_right_tokenizer_passes(tmp_path):
    copy = tmp_path / "tok"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TEACHER_DIR / name, copy / name)
    teacher = _teacher(TEACHER_DIR, copy)
    check_teacher_tokenizer(teacher, AutoTokenizer.from_pretrained(copy), ROWS, _config())


# ------------------------------------------------------------------------------------- (a)-(c) together
def test_the_demo_pairing_passes():
    recipe = SimpleNamespace(teacher=_teacher(TEACHER_DIR), distill=SimpleNamespace(method="bld"),
                             student=SimpleNamespace(tokenizer=str(STUDENT_TOKENIZER_DIR)))
    sides = setup_tokenizers(recipe, ROWS, log=lambda m: None, teacher_config=_config())
    assert sides.teacher_vocab.vocab_size == ROWS and sides.teacher_bos == 0


def test_student_tokenizer_as_teacher_tokenizer_is_refused_by_every_static_check():
    teacher = _teacher(TEACHER_DIR, STUDENT_TOKENIZER_DIR)
    with pytest.raises(TokenizerError) as err:
        check_teacher_tokenizer(teacher, AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR), ROWS, _config())
    msg = str(err.value)
    assert msg.startswith(f"teacher tokenizer (teacher.tokenizer={STUDENT_TOKENIZER_DIR}) is not the teacher "
                          f"model's (teacher.path={TEACHER_DIR}): it has 2048 ids for the model's 4096 embedding rows")
    assert "BOS token '<s>' is id 1" in msg and "EOS token '</s>' is id 2" in msg  # (b)
    assert "have the same id in the model folder's tokenizer" in msg  # (c)
    assert "Set teacher.tokenizer to the model's own tokenizer" in msg and "stale" not in msg


def test_copied_teacher_folder_with_the_students_tokenizer_is_refused(tmp_path):
    folder = copy_with_student_tokenizer(tmp_path / "teacher")
    teacher = _teacher(folder)
    with pytest.raises(TokenizerError, match=r"the tokenizer files in teacher\.path=.*2048 ids for the model's "
                                             r"4096 embedding rows.*BOS token '<s>' is id 1"):
        check_teacher_tokenizer(teacher, AutoTokenizer.from_pretrained(folder), ROWS, _config(folder))


def test_only_a_stale_config_is_suggested_when_special_ids_alone_disagree(tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 5}))
    (folder / "generation_config.json").unlink()  # it says 0 too: either file may name the id
    with pytest.raises(TokenizerError, match=r"EOS token '<\|endoftext\|>' is id 0, the model's eos_token_id is 5"
                                             r".*correct its bos_token_id / eos_token_id"):
        check_teacher_tokenizer(_teacher(folder), AutoTokenizer.from_pretrained(folder), ROWS, _config(folder))


def test_shuffled_ids_pass_the_static_checks(tmp_path):
    """Same size, same special ids: only the behavioural check (d) can see it (tested with real
    ranks in tests/integration/test_reliability.py)."""
    folder = copy_with_shuffled_ids(tmp_path / "teacher")
    check_teacher_tokenizer(_teacher(folder), AutoTokenizer.from_pretrained(folder), ROWS, _config(folder))


# ------------------------------------------------------------------------------------- (d) uniform bound
def test_uniform_bound_and_refusal():
    assert uniform_bpb(100, 400, 4096) == pytest.approx(100 * 12 / 400)
    teacher = _teacher(TEACHER_DIR, STUDENT_TOKENIZER_DIR)
    check_beats_uniform(2.99, 100, 400, 4096, teacher)  # better than 3.0: passes
    check_beats_uniform(3.0, 100, 400, 4096, teacher)  # equal: passes
    with pytest.raises(TokenizerError, match=r"token-level BPB on the held-out text is 3\.0100, worse than a "
                                             r"uniform guess over its 4096 ids \(100 tokens x log2\(4096\) / "
                                             r"400 bytes = 3\.0000\).*teacher\.tokenizer="):
        check_beats_uniform(3.01, 100, 400, 4096, teacher)


def test_eval_token_counts_are_the_evaluations():
    from bld_scale.tokenize.token_bytes import TokenBytes

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    vocab = TokenBytes.from_tokenizer(tok, vocab_size=ROWS)
    windows = ["To be, or not to be", "that is the question: ée"]
    n_tokens, n_bytes = eval_token_counts(windows, vocab)
    assert n_bytes == len(windows[0]) + len(windows[1]) + 1  # one 2-byte character (é)
    assert n_tokens == sum(len(tok(w, add_special_tokens=False)["input_ids"]) for w in windows) > 0
    assert math.isclose(uniform_bpb(n_tokens, n_bytes, ROWS), n_tokens * 12 / n_bytes)
