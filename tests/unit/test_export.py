"""The student on disk (bld_scale.model.export): the tokenizer saved with the BOS the student was
trained with, the rebuild files, and the Hugging Face folder."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR
from bld_scale.model.export import (load_full_state, save_hf_folder, save_tokenizer, student_from_files,
                                    write_student_files)
from bld_scale.model.student import build_student, load_student

TEXT = "To be, or not to be: that is the question."
CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def student_tok():
    return AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)


@pytest.mark.parametrize("folder, bos_name", [
    (STUDENT_TOKENIZER_DIR, "<s>"),           # SentencePiece Llama: adds nothing by default
    (TEACHER_DIR, "<|endoftext|>"),           # byte-level BPE whose BOS is its EOS
])
def test_the_saved_tokenizer_puts_the_training_bos_before_a_text(tmp_path, folder, bos_name):
    source = AutoTokenizer.from_pretrained(folder)
    plain = source(TEXT, add_special_tokens=False)["input_ids"]
    assert source(TEXT)["input_ids"] == plain  # what the shipped files do by default
    bos = source.convert_tokens_to_ids(bos_name)
    save_tokenizer(source, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved(TEXT)["input_ids"] == [bos] + plain  # what training feeds: [BOS] + the text's tokens
    assert saved(TEXT, add_special_tokens=False)["input_ids"] == plain
    assert saved.decode(saved(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert source(TEXT)["input_ids"] == plain  # the tokenizer training uses is not changed
    assert len(saved) == len(source)


def test_the_rebuild_files_and_the_hf_folder_give_the_same_student(tmp_path, student_tok):
    torch.manual_seed(0)
    student = build_student({**CONFIG, "vocab_size": len(student_tok)}, head_kind="causal", K=4,
                            attn_implementation="sdpa", head_size={"width": 32, "layers": 1}).eval()
    write_student_files(student, student_tok, tmp_path / "files")
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [
        "byte_head.json", "config.json", "tokenizer.json", "tokenizer_config.json"]  # no weights
    rebuilt, tok = student_from_files(tmp_path / "files")
    load_full_state(rebuilt, student.state_dict())
    rebuilt.eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == student_tok.bos_token_id
    prev = torch.zeros(1, ids.shape[1], 4, dtype=torch.long)
    with torch.no_grad():
        want = student(ids, prev_bytes=prev)
        got = rebuilt(ids, prev_bytes=prev)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])

    save_hf_folder(rebuilt, tok, tmp_path / "hf")
    loaded = load_student(tmp_path / "hf", attn_implementation="sdpa").eval()
    with torch.no_grad():
        again = loaded(ids, prev_bytes=prev)
    assert torch.equal(want[0], again[0]) and torch.equal(want[1], again[1])
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT)["input_ids"] == ids[0].tolist()
    head = json.loads((tmp_path / "hf" / "byte_head.json").read_text())
    assert head == {"kind": "causal", "hidden_size": 64, "K": 4, "size": student.byte_head.size_config()}

    save_hf_folder(rebuilt, tok, tmp_path / "bare", byte_head=False)
    assert not (tmp_path / "bare" / "byte_head.json").exists()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    assert torch.equal(lm.model.embed_tokens.weight, student.lm.model.embed_tokens.weight)


def test_a_state_that_does_not_fit_is_refused(tmp_path, student_tok):
    student = build_student({**CONFIG, "vocab_size": len(student_tok)}, head_kind="linear", K=4,
                            attn_implementation="sdpa")
    write_student_files(student, student_tok, tmp_path)
    rebuilt, _ = student_from_files(tmp_path)
    state = student.state_dict()
    dropped = next(k for k in state if k.startswith("byte_head."))
    del state[dropped]
    with pytest.raises(RuntimeError, match=f"step-6: .*missing \\['{dropped}'\\]"):
        load_full_state(rebuilt, state, where="step-6")
