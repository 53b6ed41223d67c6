"""The shipped demo assets: they exist, load offline, are byte-exact and the teacher has learned.

Made by tools/train_demo_tokenizers.py and tools/train_demo_teacher.py; see bld_scale/demo.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bld_scale import demo
from bld_scale.data.corpus import HELDOUT_WORKS, load_works
from bld_scale.tokenize.token_bytes import TokenBytes


@pytest.fixture(scope="module")
def teacher():
    return demo.load_demo_teacher()


@pytest.fixture(scope="module")
def student_tok():
    return demo.load_demo_student_tokenizer()


@pytest.fixture(scope="module")
def heldout_paragraphs() -> list[str]:
    """A few held-out paragraphs of each held-out work, with punctuation, verse and prose."""
    paragraphs = []
    for name, text in load_works("heldout").items():
        blocks = [b for b in text.split("\n\n") if len(b) > 200]
        # Spread over the work, and keep the joining blank lines/trailing newline of one block.
        paragraphs += [blocks[i] for i in range(0, len(blocks), max(1, len(blocks) // 4))][:4]
        paragraphs.append(text[len(text) // 2: len(text) // 2 + 3000])
    return paragraphs


def test_shipped_files_exist():
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "TRAINING.json", "metrics.jsonl"]:
        assert (demo.TEACHER_DIR / name).is_file(), name
    for name in ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]:
        assert (demo.STUDENT_TOKENIZER_DIR / name).is_file(), name
    # Small enough to ship inside the package.
    assert (demo.TEACHER_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_training_record_never_used_heldout_works():
    record = json.loads((demo.TEACHER_DIR / "TRAINING.json").read_text())
    assert not set(record["data"]["train_works"]) & set(HELDOUT_WORKS)
    assert sorted(record["data"]["heldout_works"]) == sorted(HELDOUT_WORKS)
    assert record["heldout"]["bpb"] < record["heldout"]["unigram_baseline_bpb"]


def test_missing_assets_name_the_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TEACHER_DIR", tmp_path / "teacher")
    monkeypatch.setattr(demo, "STUDENT_TOKENIZER_DIR", tmp_path / "student_tokenizer")
    with pytest.raises(FileNotFoundError, match="tools/train_demo_teacher.py"):
        demo.demo_teacher_path()
    with pytest.raises(FileNotFoundError, match="tools/train_demo_tokenizers.py"):
        demo.load_demo_student_tokenizer()
    with pytest.raises(FileNotFoundError, match="tools/train_demo_teacher.py"):
        demo.load_demo_teacher()


def test_teacher_loads_offline(teacher):
    model, tok = teacher
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) == 4096
    assert model.config.tie_word_embeddings
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert model.config.bos_token_id == tok.bos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 10e6


def _unigram_bpb(tok, train_texts, ids, n_bytes) -> float:
    """BPB of a Laplace-smoothed unigram model of the teacher's tokens fit on the training text."""
    counts = torch.ones(len(tok), dtype=torch.double)
    for enc in tok(train_texts, add_special_tokens=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(enc), minlength=len(tok)).double()
    logp = (counts / counts.sum()).log()
    return -float(logp[torch.tensor(ids)].sum()) / (n_bytes * math.log(2))


def test_teacher_beats_unigram_on_heldout(teacher):
    """Token-level bits per byte of the teacher on unseen text, against two bounds.

    8 bits/byte is what a uniform guess over bytes costs, so anything trained must be far below.
    The sharper bound is a unigram model of the teacher's own tokens fit on the training works:
    it knows every token's frequency but no context, so a teacher that learned anything about
    context must beat it clearly (the unigram costs ~3.1 bits/byte on this snippet, the shipped
    teacher ~2.3).
    """
    model, tok = teacher
    text = load_works("heldout")["hamlet"][40_000:44_000]
    ids, spans = TokenBytes.from_tokenizer(tok).encode(text)
    ids = ids[:255]  # [BOS] + 255 tokens, within the positions the teacher was trained on
    n_bytes = spans[len(ids) - 1][1]
    inp = torch.tensor([[tok.bos_token_id] + ids])
    with torch.no_grad():
        logp = model(input_ids=inp).logits.float().log_softmax(-1)[0]
    assert torch.isfinite(logp).all()
    # Row k predicts token k+1 of the input: rows 0..L-1 score t_1..t_L.
    nats = -float(logp[:-1].gather(-1, torch.tensor(ids)[:, None]).sum())
    bpb = nats / (n_bytes * math.log(2))

    train = load_works("train")
    unigram = _unigram_bpb(tok, [train[k] for k in sorted(train)[:3]], ids, n_bytes)
    assert bpb < 8.0
    assert bpb < 0.85 * unigram, (bpb, unigram)


def test_both_tokenizers_byte_exact_on_heldout(teacher, student_tok, heldout_paragraphs):
    _, teacher_tok = teacher
    tables = [TokenBytes.from_tokenizer(teacher_tok), TokenBytes.from_tokenizer(student_tok),
              TokenBytes.from_tokenizer(demo.load_demo_student_sentencepiece())]
    for text in heldout_paragraphs:
        n = len(text.encode("utf-8"))
        for table in tables:
            ids, spans = table.encode(text)  # raises unless the tokens rebuild the text exactly
            assert spans[0][0] == 0 and spans[-1][1] == n


def test_student_hf_matches_sentencepiece(student_tok, heldout_paragraphs):
    sp = demo.load_demo_student_sentencepiece()
    assert sp.get_piece_size() == len(student_tok) == 2048
    for text in heldout_paragraphs:
        assert student_tok.encode(text, add_special_tokens=False) == sp.encode(text, out_type=int)


def test_tokenizers_are_of_different_families(teacher, student_tok, heldout_paragraphs):
    _, teacher_tok = teacher
    t_spec = json.loads(teacher_tok.backend_tokenizer.to_str())
    s_spec = json.loads(student_tok.backend_tokenizer.to_str())
    assert t_spec["pre_tokenizer"]["type"] == "ByteLevel"  # GPT-2-style byte-level BPE
    assert s_spec["pre_tokenizer"]["type"] == "Metaspace"  # SentencePiece-style, "▁" for spaces
    assert s_spec["model"]["byte_fallback"]
    assert (demo.STUDENT_TOKENIZER_DIR / "tokenizer.model").read_bytes()[:1] != b"{"  # a protobuf

    text = heldout_paragraphs[0]
    t_ids, t_spans = TokenBytes.from_tokenizer(teacher_tok).encode(text)
    s_ids, s_spans = TokenBytes.from_tokenizer(student_tok).encode(text)
    # Different vocabularies cut the same text at different byte offsets.
    assert {b for _, b in t_spans} != {b for _, b in s_spans}
    assert len(t_ids) != len(s_ids) or t_ids != s_ids
