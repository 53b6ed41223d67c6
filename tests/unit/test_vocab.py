"""TokenBytes: bytes of every vocabulary row and byte-exact canonical encoding, on real offline
vocabularies (Tekken, Mistral-7B v0.1 SentencePiece in both forms) and on tokenizers trained here
(byte-level BPE, SentencePiece with byte fallback, Llama-3/Qwen2-style, Gemma-style)."""
from __future__ import annotations

import base64
import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bld_scale.tokenize.token_bytes import TokenBytes

SP_SPACE = "\u2581"
ALL = ["tekken", "mistral_sp", "mistral_hf", "bpe", "sp", "llama3", "gemma_sp", "gemma_hf"]

HOSTILE = [
    "",
    " ",
    "  ",
    "a",
    "Hello, world!",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\tTabbed\tline\t",
    "windows\r\nline\r\nendings\r\n",
    "\r\n",
    "\n\n\nblank lines\n\n",
    "runs     of      spaces",
    " \t \r\n \u00a0 \u3000 mixed whitespace",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<s>[INST] What is this? [/INST] An answer</s>",
    "<unk><pad><bos><eos></s><s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><SPECIAL_12>",
    "<tool_call>{}</tool_call>",
    "<0x41><0xFF>",
    "👩\u200d👩\u200d👧\u200d👦 family, 👍🏽 thumbs, 🇫🇷 flag, 🏳️\u200d🌈",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "e\u0301 a\u0308 n\u0303 \u1100\u1161\u11a8 क्षि",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea",
    "\x00\x01\x1f\x7f control",
    "\ufeffBOM and \ufffd replacement",
    "𝕳𝖊𝖑𝖑𝖔 𐍈 \U0010fffd",
    "a" * 300,
    "1234567890 3.14159 1,000,000",
    "O, that this too too solid flesh would melt,\nThaw and resolve itself into a dew!",
]


def check_encoding(case, text: str):
    """The contract of `encode`, checked against the tokenizer's own ids."""
    tb = case.tb
    data = text.encode("utf-8")
    ids, spans = tb.encode(text)
    assert ids == case.reference_ids(text), f"{case.name}: ids differ from the tokenizer's own"
    assert len(spans) == len(ids)
    pieces = [tb.token_bytes(i) for i in ids]
    assert all(p is not None for p in pieces), "a special token in a plain-text encoding"
    # Spans: contiguous from 0 to len(data), each inside the text.
    pos = 0
    for a, b in spans:
        assert a == pos and b >= a
        pos = b
    assert pos == len(data)
    rebuilt = b"".join(pieces)
    if ids:
        shift = len(pieces[0]) - (spans[0][1] - spans[0][0])
        assert shift in (0, 1)
        if shift:
            assert case.dummy_prefix, f"{case.name} has no dummy prefix but a shifted first span"
            assert rebuilt[:1] == b" "
        assert rebuilt[shift:] == data
        # Every token but the first covers exactly its own bytes.
        for (a, b), piece in zip(spans[1:], pieces[1:]):
            assert data[a:b] == piece
        assert data[spans[0][0]:spans[0][1]] == pieces[0][shift:]
    else:
        assert data == b""
    return ids, spans


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("name", ALL)
def test_vocab_size_matches_tokenizer(case_of, name):
    case = case_of(name)
    tok, tb = case.tok, case.tb
    if name == "tekken":
        expected = tok.n_vocab
        assert expected == 131_072
    elif case.family == "sentencepiece":
        expected = tok.get_piece_size()
    else:
        expected = len(tok)
    if name.startswith("mistral"):
        assert expected == 32_000
    assert tb.vocab_size == expected == len(tb.all_token_bytes())
    assert tb.max_token_len == max(len(b) for b in tb.all_token_bytes() if b)
    assert tb.index is tb.index  # built once


@pytest.mark.parametrize("name", ALL)
def test_vocab_size_padding_and_too_small(case_of, name):
    case = case_of(name)
    n = case.tb.vocab_size
    padded = TokenBytes.from_tokenizer(case.tok, vocab_size=n + 37)
    assert padded.vocab_size == n + 37
    assert padded.all_token_bytes()[:n] == case.tb.all_token_bytes()
    assert all(padded.token_bytes(i) is None for i in range(n, n + 37))
    for bad in (-1, n + 37):
        with pytest.raises(IndexError):
            padded.token_bytes(bad)
    assert padded.index.vocab_size == n + 37
    assert set(padded.index.perm.tolist()) == {i for i in range(n) if case.tb.token_bytes(i)}
    # Padding does not change encodings.
    assert padded.encode("Padding rows, never used.") == case.tb.encode("Padding rows, never used.")
    assert TokenBytes.from_tokenizer(case.tok, vocab_size=n).vocab_size == n
    with pytest.raises(ValueError, match=rf"(?s){n - 1}.*{n}") as err:
        TokenBytes.from_tokenizer(case.tok, vocab_size=n - 1)
    assert case.tb.name in str(err.value)


def test_names_say_which_tokenizer(case_of):
    assert "tekken" in case_of("tekken").tb.name
    assert "SentencePiece" in case_of("mistral_sp").tb.name
    assert "LlamaTokenizer" in case_of("mistral_hf").tb.name
    assert "GemmaTokenizer" in case_of("gemma_hf").tb.name
    named = TokenBytes.from_tokenizer(case_of("sp").tok, name="my-sp")
    assert named.name == "my-sp"


def test_unsupported_tokenizer_type():
    with pytest.raises(TypeError, match="unsupported tokenizer type"):
        TokenBytes.from_tokenizer(object())


def test_wordpiece_is_refused(train_texts):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(train_texts[:1], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(TypeError, match="neither byte-level BPE nor SentencePiece"):
        TokenBytes.from_tokenizer(hf)


# ---------------------------------------------------------------------- token bytes
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's published byte-to-unicode map (openai/gpt-2 encoder.py), written out here."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.mark.parametrize("name", ["bpe", "llama3"])
def test_byte_level_bytes(case_of, name):
    case = case_of(name)
    tok, tb = case.tok, case.tb
    decode = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    assert len(decode) == 256
    special = set(tok.all_special_ids)
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    for piece, i in tok.get_vocab().items():
        if i in special:
            assert tb.token_bytes(i) is None
        elif i in added:
            assert tb.token_bytes(i) == added[i].content.encode("utf-8")
        else:
            assert tb.token_bytes(i) == bytes(decode[c] for c in piece), piece
    # All 256 single bytes are tokens (the ByteLevel initial alphabet).
    singles = {b for b in tb.all_token_bytes() if b and len(b) == 1}
    assert len(singles) == 256
    if name == "llama3":
        for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"):
            assert tb.token_bytes(tok.convert_tokens_to_ids(s)) is None
        assert tb.token_bytes(tok.convert_tokens_to_ids("<tool_call>")) == b"<tool_call>"


def test_tekken_bytes_against_the_vocabulary_file(case_of):
    from bld_scale.tokenize.zoo import _mistral_data_dir

    tb = case_of("tekken").tb
    spec = json.loads((_mistral_data_dir() / "tekken_240911.json").read_text())
    n_special = spec["config"]["default_num_special_tokens"]
    assert n_special == 1000
    assert all(tb.token_bytes(i) is None for i in range(n_special))
    vocab = spec["vocab"][: tb.vocab_size - n_special]
    for entry in vocab:
        assert tb.token_bytes(entry["rank"] + n_special) == base64.b64decode(entry["token_bytes"])
    assert all(tb.token_bytes(i) is not None for i in range(n_special, tb.vocab_size))
    assert {tb.token_bytes(i) for i in range(n_special, n_special + 256)} == {bytes([b]) for b in range(256)}


@pytest.mark.parametrize("name", ["mistral_sp", "sp", "gemma_sp"])
def test_sentencepiece_bytes(case_of, name):
    case = case_of(name)
    sp, tb = case.tok, case.tb
    anchor = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i) == "a")
    normal = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i) or sp.is_control(i):
            assert tb.token_bytes(i) is None, piece
        elif sp.is_byte(i):
            assert piece.startswith("<0x") and tb.token_bytes(i) == bytes([int(piece[3:5], 16)])
        else:
            normal.append(i)
    # Independent: SentencePiece's own decoder after an anchor piece "a" (no leading-space strip).
    decoded = sp.decode([[anchor, i] for i in normal], out_type=bytes)
    for i, out in zip(normal, decoded):
        assert out[:1] == b"a"
        assert tb.token_bytes(i) == out[1:], sp.id_to_piece(i)
    assert {tb.token_bytes(i) for i in range(sp.get_piece_size()) if sp.is_byte(i)} \
        == {bytes([b]) for b in range(256)}
    if name == "mistral_sp":
        assert [tb.token_bytes(i) for i in (0, 1, 2)] == [None, None, None]
        assert tb.token_bytes(3) == b"\x00" and tb.token_bytes(258) == b"\xff"
        assert tb.token_bytes(sp.piece_to_id(SP_SPACE)) == b" "
        assert tb.token_bytes(sp.piece_to_id("▁the")) == b" the"


@pytest.mark.parametrize("hf_name, sp_name", [("mistral_hf", "mistral_sp"), ("gemma_hf", "gemma_sp")])
def test_hf_sentencepiece_table_equals_sentencepiece(case_of, hf_name, sp_name):
    """The Hugging Face form of a SentencePiece model gives every row the same bytes."""
    hf, sp = case_of(hf_name).tb.all_token_bytes(), case_of(sp_name).tb.all_token_bytes()
    assert hf[:len(sp)] == sp
    assert all(b is None for b in hf[len(sp):])  # extra special tokens the conversion may add


# ---------------------------------------------------------------------- encode: hostile text
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_text(case_of, name, text):
    check_encoding(case_of(name), text)


@pytest.mark.parametrize("name", ALL)
def test_empty_text(case_of, name):
    assert case_of(name).tb.encode("") == ([], [])


@pytest.mark.parametrize("name", ALL)
def test_dummy_prefix(case_of, name):
    case = case_of(name)
    for text in ("Hello", "\nnewline first", "日本", " space first"):
        ids, spans = case.tb.encode(text)
        first = case.tb.token_bytes(ids[0])
        shift = len(first) - (spans[0][1] - spans[0][0])
        expected = 1 if case.dummy_prefix else 0
        if text[0] == " " and case.family == "hf_sentencepiece":
            # Hugging Face's Metaspace(prepend_scheme="first") adds no "▁" to a text that already
            # starts with a space (SentencePiece itself does): no dummy prefix there.
            expected = 0
        assert shift == expected, (text, first, spans[0])
        assert spans[0][0] == 0


def test_dummy_prefix_of_a_space_only_piece(case_of):
    """SentencePiece encodes ' a' as '▁' (the dummy prefix) + '▁a': the first span is empty."""
    tb = case_of("mistral_sp").tb
    ids, spans = tb.encode(" a")
    assert [tb.token_bytes(i) for i in ids] == [b" ", b" a"]
    assert spans == [(0, 0), (0, 2)]


@pytest.mark.parametrize("name", ALL)
def test_literal_special_tokens_are_text(case_of, name):
    case = case_of(name)
    for text in ("<|endoftext|>", "<s>", "</s>", "[INST]", "<unk>", "<|im_start|>", "<bos>", "<pad>",
                 "<SPECIAL_20>"):
        ids, _ = check_encoding(case, text)
        assert all(case.tb.token_bytes(i) is not None for i in ids)


@pytest.mark.parametrize("name", ALL)
def test_batch_encoding_equals_one_text_at_a_time(case_of, heldout_text, name):
    """`encode_ids_batch` (the tokenizer's own batch call, used by mode 'exact') gives the ids of
    the single-text encoder, specials-as-text included, and leaves the tokenizer as it was."""
    case = case_of(name)
    texts = ["", " ", "<|endoftext|> and <s>", "a<tool_call>b", "  two  spaces", "é😀 x"]
    texts += [heldout_text[i:i + 70] for i in range(0, 3500, 50)]
    backend = getattr(case.tok, "backend_tokenizer", None)
    flag = getattr(backend, "encode_special_tokens", None)
    batch = case.tb.encode_ids_batch(texts)
    assert getattr(backend, "encode_special_tokens", None) == flag
    assert batch == [list(map(int, case.tb._encode_ids(t))) for t in texts]


def test_encode_leaves_hf_special_handling_alone(case_of):
    case = case_of("llama3")
    tok = case.tok
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ids, _ = case.tb.encode("<|endoftext|>")
    assert eot not in ids
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [eot]
    ids, _ = case.tb.encode("a<tool_call>b")
    assert tok.convert_tokens_to_ids("<tool_call>") in ids  # a plain added token is still matched


@pytest.mark.parametrize("name", ["mistral_sp", "mistral_hf", "sp", "gemma_sp", "gemma_hf"])
def test_multibyte_characters_split_over_byte_pieces(case_of, name):
    case = case_of(name)
    tb = case.tb
    text = "x\U0001f9ec\u9f98y"  # 🧬 and 龘: not pieces of these vocabularies
    ids, spans = check_encoding(case, text)
    byte_tokens = [(i, s) for i, s in zip(ids, spans) if len(tb.token_bytes(i)) == 1
                   and tb.token_bytes(i)[0] >= 0x80]
    assert len(byte_tokens) == 7  # 4 + 3 continuation/lead bytes, one piece each
    for i, (a, b) in byte_tokens:
        assert b - a == 1


@pytest.mark.parametrize("name", ["tekken", "bpe", "llama3"])
def test_byte_level_tokens_may_split_characters(case_of, name):
    case = case_of(name)
    text = "\U0001f9ec\U0001f9ec \u9f98\u9f98 \U00010348"
    ids, spans = check_encoding(case, text)
    data = text.encode()
    char_starts = {len(text[:k].encode()) for k in range(len(text) + 1)}
    assert any(a not in char_starts for a, _ in spans), "expected a token boundary inside a character"
    assert spans[-1][1] == len(data)


# ---------------------------------------------------------------------- errors
def test_nfkc_normaliser_is_refused(nfkc_tok):
    tb = TokenBytes.from_tokenizer(nfkc_tok, name="nfkc-bpe")
    ids, spans = tb.encode("plain ascii text")
    assert spans[-1][1] == len("plain ascii text")
    for text in ("\ufb01ne", "\u2460", "x\u00bd", "\uff21"):
        assert unicodedata.normalize("NFKC", text) != text
        with pytest.raises(ValueError, match=r"nfkc-bpe cannot keep this text byte-exact.*NFKC"):
            tb.encode(text)
    # The default name names the tokenizer's class.
    with pytest.raises(ValueError, match="Hugging Face"):
        TokenBytes.from_tokenizer(nfkc_tok).encode("\ufb01")


@pytest.mark.parametrize("name", ALL)
def test_tokenizers_without_normaliser_have_no_normal_form(case_of, name):
    assert case_of(name).tb.normal_forms == ()


def test_unicode_normal_forms_are_named(nfkc_tok, train_texts):
    """The forms `data.normalize` can neutralise, read from each kind of tokenizer."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bld_scale.tokenize.zoo import train_sentencepiece

    assert TokenBytes.from_tokenizer(nfkc_tok).normal_forms == ("NFKC",)
    sp = train_sentencepiece(train_texts, 400, normalization_rule_name="nmt_nfkc")
    assert TokenBytes.from_tokenizer(sp).normal_forms == ("NFKC",)
    assert sp.decode(sp.encode("\ufb01ne")) == "fine"  # it does rewrite the ligature
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())

    def hf(normalizer):
        tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    charsmap = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    assert charsmap.normalize_str("\ufb01") == "fi"
    assert TokenBytes.from_tokenizer(hf(charsmap)).normal_forms == ("NFKC",)
    both = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.NFD()])
    assert TokenBytes.from_tokenizer(hf(both)).normal_forms == ("NFD",)
    assert TokenBytes.from_tokenizer(hf(normalizers.Lowercase())).normal_forms == ()


@pytest.mark.parametrize("name", ["mistral_sp", "mistral_hf", "sp", "gemma_sp", "gemma_hf"])
def test_literal_metaspace_is_refused(case_of, name):
    tb = case_of(name).tb
    for text in (SP_SPACE, f"a{SP_SPACE}b", f"{SP_SPACE}lead", f"trail {SP_SPACE}"):
        with pytest.raises(ValueError) as err:
            tb.encode(text)
        message = str(err.value)
        assert tb.name in message and "byte-exact" in message and SP_SPACE in message


@pytest.mark.parametrize("name", ["tekken", "bpe", "llama3"])
def test_literal_metaspace_is_fine_for_byte_level(case_of, name):
    check_encoding(case_of(name), f"a{SP_SPACE}b {SP_SPACE}")


def test_unknown_token_is_refused(sp_nofallback_tok):
    tb = TokenBytes.from_tokenizer(sp_nofallback_tok)
    ids, _ = tb.encode("the king")
    assert ids == sp_nofallback_tok.encode_as_ids("the king")
    with pytest.raises(ValueError) as err:
        tb.encode("the king \u9f98")
    message = str(err.value)
    assert tb.name in message and "unknown token" in message and "byte-exact" in message


@pytest.mark.parametrize("name", ["tekken", "mistral_sp", "bpe"])
def test_bad_input_types_and_surrogates(case_of, name):
    tb = case_of(name).tb
    with pytest.raises(ValueError, match="surrogate"):
        tb.encode("a\ud800b")
    with pytest.raises(TypeError, match="str"):
        tb.encode(b"bytes")


# ---------------------------------------------------------------------- real text
@pytest.mark.parametrize("name", ALL)
def test_heldout_text(case_of, heldout_text, name):
    check_encoding(case_of(name), heldout_text[:20_000])


def test_tekken_matches_mistral_common(case_of, heldout_text):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from bld_scale.tokenize.zoo import _mistral_data_dir

    ref = Tekkenizer.from_file(_mistral_data_dir() / "tekken_240911.json")
    tb = case_of("tekken").tb
    for text in [heldout_text[:5000], *HOSTILE[1:12], *HOSTILE[22:30]]:
        ids, _ = tb.encode(text)
        assert ids == ref.encode(text, bos=False, eos=False)


def test_mistral_hf_matches_sentencepiece(case_of, heldout_text):
    """Both forms of Mistral-7B v0.1 agree on lines that do not start with whitespace. (On a
    leading space or a run of spaces the Hugging Face conversion may merge differently; both stay
    byte-exact, which `test_hostile_text` checks.)"""
    sp, hf = case_of("mistral_sp").tb, case_of("mistral_hf").tb
    lines = [ln for ln in heldout_text.splitlines()[:1500] if ln and not ln[0].isspace()]
    assert len(lines) > 500
    for line in lines:
        assert sp.encode(line) == hf.encode(line), line


# ---------------------------------------------------------------------- properties
UNICODE = st.characters(exclude_categories=("Cs",))
MIXED = st.one_of(
    UNICODE,
    st.sampled_from([" ", "  ", "\t", "\r\n", "\n", "\u00a0", "\u200d", "\u0301", "e", "<", ">", "|",
                     "<s>", "</s>", "[INST]", "<|endoftext|>", "<|im_start|>", "<0x41>", "👩",
                     "日", "🇫", "1"]))
TEXTS = st.lists(MIXED, max_size=24).map("".join)
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("name", ALL)
@PROPERTY
@given(text=TEXTS)
def test_property_random_unicode(case_of, name, text):
    case = case_of(name)
    if case.sentencepiece_like:
        text = text.replace(SP_SPACE, "")  # a literal ▁ is refused on purpose (tested above)
    check_encoding(case, text)


@pytest.mark.parametrize("name", ["mistral_sp", "sp", "gemma_hf"])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=TEXTS, after=TEXTS)
def test_property_literal_metaspace_always_refused(case_of, name, before, after):
    with pytest.raises(ValueError, match="byte-exact"):
        case_of(name).tb.encode(before + SP_SPACE + after)
