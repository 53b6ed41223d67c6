"""A tokenizer that normalises text (NFKC...) is caught at start-up, not at the step that meets
'ﬁ'; `data.normalize` puts the text in the tokenizer's form so that its spans stay byte-exact."""
from __future__ import annotations

import json
import unicodedata

import pytest

from bld_scale.data.batch import PairTokenizer, split_windows
from bld_scale.data.errors import DataError
from bld_scale.data.normalize import check_normal_forms, first_change
from bld_scale.data.sources import load_documents
from bld_scale.tokenize.token_bytes import TokenBytes

PLAIN = "The office of the king.\nA fine day, said he.\n"
LIGATURE = "The o\ufb03ce of the king.\nA \ufb01ne day, said he \u2460.\n"  # ﬃ, ﬁ, ①


class Log(list):
    def __call__(self, message):
        self.append(message)


@pytest.fixture()
def nfkc_vocab(nfkc_tok):
    return TokenBytes.from_tokenizer(nfkc_tok, name="student tokenizer (nfkc-bpe)")


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_normalising_tokenizer_is_refused_at_start_naming_character_place_and_fix(
        tmp_path, nfkc_vocab, bpe_tok, streaming):
    write_jsonl(tmp_path / "train.jsonl", [PLAIN, PLAIN, LIGATURE])
    docs = load_documents([str(tmp_path / "train.jsonl")], "jsonl", streaming=streaming, log=None)
    teacher = TokenBytes.from_tokenizer(bpe_tok, name="teacher tokenizer")
    assert teacher.normal_forms == () and nfkc_vocab.normal_forms == ("NFKC",)
    with pytest.raises(DataError) as err:
        check_normal_forms([("data.train", docs)], [teacher, nfkc_vocab], "none")
    message = str(err.value)
    assert message.startswith("student tokenizer (nfkc-bpe) normalises text with NFKC, which changes "
                              "'ﬃ' (U+FB03 LATIN SMALL LIGATURE FFI) into 'ffi': data.train has it in "
                              f"{tmp_path / 'train.jsonl'} line 3 (character 5)")
    assert "data.normalize: nfkc" in message
    # what the check prevents: the pair tokenizer fails on the window holding it (at some step)
    windows = [w for d in [PLAIN, LIGATURE] for w in split_windows(d, 32)]
    pair = PairTokenizer(teacher, nfkc_vocab)
    pair(windows[0])
    with pytest.raises(ValueError, match="cannot keep this text byte-exact"):
        [pair(w) for w in windows]


def test_with_data_normalize_the_text_is_nfkc_and_every_window_is_byte_exact(tmp_path, nfkc_vocab, bpe_tok):
    (tmp_path / "a.txt").write_text(LIGATURE)
    log = Log()
    docs = load_documents([str(tmp_path / "a.txt")], "text", normalize="nfkc", log=None)
    teacher = TokenBytes.from_tokenizer(bpe_tok)
    check_normal_forms([("data.train", docs)], [teacher, nfkc_vocab], "nfkc", log=log)
    assert log == []  # nothing to scan: the text is in the tokenizer's form already
    assert list(docs) == [unicodedata.normalize("NFKC", LIGATURE)]
    assert "\ufb01" not in docs[0] and "fine day" in docs[0] and "\u2460" not in docs[0]
    pair = PairTokenizer(teacher, nfkc_vocab)
    for window in split_windows(docs[0], 32):
        example = pair(window)
        assert example.text_bytes == window.encode("utf-8")
        rebuilt = b"".join(nfkc_vocab.token_bytes(i) for i in example.student_ids)
        assert rebuilt == window.encode("utf-8")


def test_a_clean_corpus_passes_after_one_scan(tmp_path, nfkc_vocab):
    (tmp_path / "a.txt").write_text(PLAIN)
    (tmp_path / "b.txt").write_text("caf\u00e9 \u65e5\u672c")  # precomposed é is NFKC already
    log = Log()
    train = load_documents([str(tmp_path / "*.txt")], "text", log=None)
    check_normal_forms([("data.train", train), ("data.heldout", ["more plain text"])], [nfkc_vocab],
                       "none", log=log)
    assert len(log) == 1 and log[0].startswith("student tokenizer (nfkc-bpe) normalises text with NFKC: "
                                               "checked 3 documents of data.train, data.heldout")


def test_heldout_text_is_checked_too(nfkc_vocab):
    with pytest.raises(DataError, match=r"'①' .* into '1': data.heldout has it in document 1"):
        check_normal_forms([("data.train", [PLAIN]), ("data.heldout", [PLAIN, "x \u2460"])],
                           [nfkc_vocab], "none")


def test_nfc_forms_cover_and_composition_is_named():
    class Vocab:
        name, normal_forms = "nfc-tokenizer", ("NFC",)

    docs = ["plain", "cafe\u0301 au lait"]
    with pytest.raises(DataError, match=r"changes 'e\u0301' \(U\+0065 LATIN SMALL LETTER E \+ U\+0301 "
                                        r"COMBINING ACUTE ACCENT\) into 'é'.*document 1 \(character 3\)"
                                        r".*data.normalize: nfc"):
        check_normal_forms([("data.train", docs)], [Vocab()], "none")
    for covering in ("nfc", "nfkc"):  # NFKC text is NFC text: no scan, no refusal
        check_normal_forms([("data.train", docs)], [Vocab()], covering)


@pytest.mark.parametrize("form", ["NFC", "NFD", "NFKC", "NFKD"])
@pytest.mark.parametrize("text", ["plain ascii", "caf\u00e9", "cafe\u0301", "\ufb01ne", "x\u2460y",
                                  "\uac00\u11a8", "\u1100\u1161", "a\u0328\u0301", "e\u0301\u212b"])
def test_first_change_is_where_normalize_first_differs(form, text):
    out = unicodedata.normalize(form, text)
    differs = [i for i, (a, b) in enumerate(zip(text, out)) if a != b]
    expected = None if out == text else (differs[0] if differs else min(len(text), len(out)))
    assert first_change(text, form) == expected


def test_unknown_normalize_value_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(PLAIN)
    with pytest.raises(DataError, match="data.normalize: unknown value 'nfkc_cf'"):
        load_documents([str(tmp_path / "a.txt")], "text", normalize="nfkc_cf", log=None)
