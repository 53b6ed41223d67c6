"""Shared fixtures: real offline tokenizers and small ones trained here on the shipped text.

Everything is session-scoped and offline. The locally trained tokenizers use a slice of the
training works so that the whole set builds in a few seconds.
"""
from __future__ import annotations

import pathlib
import tempfile

import pytest

SP_SPACE = "\u2581"
TRAIN_WORKS = 8  # works used for local training
TRAIN_CHARS = 40_000  # characters taken from each


@pytest.fixture(scope="session")
def train_texts() -> list[str]:
    from bld_scale.data.corpus import load_works

    works = load_works("train")
    return [text[:TRAIN_CHARS] for _, text in sorted(works.items())[:TRAIN_WORKS]]


@pytest.fixture(scope="session")
def heldout_text() -> str:
    from bld_scale.data.corpus import load_works

    return load_works("heldout")["hamlet"]


# ---------------------------------------------------------------------- real vocabularies
@pytest.fixture(scope="session")
def tekken_tok():
    from bld_scale.tokenize.zoo import tekken

    return tekken()


@pytest.fixture(scope="session")
def mistral_sp_tok():
    from bld_scale.tokenize.zoo import mistral_sentencepiece

    return mistral_sentencepiece()


@pytest.fixture(scope="session")
def mistral_hf_tok():
    from bld_scale.tokenize.zoo import mistral_hf

    return mistral_hf()


# ---------------------------------------------------------------------- trained here
@pytest.fixture(scope="session")
def bpe_tok(train_texts):
    """GPT-2-style byte-level BPE (Hugging Face fast tokenizer, <|endoftext|> special)."""
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    return train_byte_level_bpe(train_texts, 1024)


@pytest.fixture(scope="session")
def sp_tok(train_texts):
    """Llama-style SentencePiece (BPE, byte fallback, dummy prefix, identity normaliser)."""
    from bld_scale.tokenize.zoo import train_sentencepiece

    return train_sentencepiece(train_texts, 1024)


@pytest.fixture(scope="session")
def sp_nofallback_tok(train_texts):
    """SentencePiece without byte fallback: unseen characters become <unk>."""
    from bld_scale.tokenize.zoo import train_sentencepiece

    return train_sentencepiece(train_texts, 600, byte_fallback=False)


@pytest.fixture(scope="session")
def nfkc_tok(train_texts):
    """Byte-level BPE behind an NFKC normaliser (rewrites e.g. the ligature 'ﬁ' to 'fi')."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_texts, trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
PLAIN_ADDED = "<tool_call>"  # a non-special added token (Qwen2.5 has such ones)


@pytest.fixture(scope="session")
def llama3_tok(train_texts):
    """Llama-3 / Qwen2-style byte-level BPE: regex split + ByteLevel, chat special tokens, and one
    non-special added token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_texts, trainers.BpeTrainer(
        vocab_size=900, special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken(PLAIN_ADDED, special=False, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="session")
def gemma_sp_tok(train_texts):
    """SentencePiece without dummy prefix (Gemma-style ids: pad 0, eos 1, bos 2, unk 3)."""
    from bld_scale.tokenize.zoo import train_sentencepiece

    return train_sentencepiece(train_texts, 800, add_dummy_prefix=False, pad_id=0, eos_id=1,
                               bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                               bos_piece="<bos>", unk_piece="<unk>")


@pytest.fixture(scope="session")
def gemma_hf_tok(gemma_sp_tok):
    """The same model as a Hugging Face GemmaTokenizer (Replace ' ' -> '▁' normaliser, BPE with
    byte fallback, no dummy prefix), converted offline."""
    from transformers import GemmaTokenizer

    from bld_scale.tokenize.zoo import save_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        save_sentencepiece(gemma_sp_tok, pathlib.Path(tmp) / "tokenizer.model")
        return GemmaTokenizer.from_pretrained(tmp)


# ---------------------------------------------------------------------- TokenBytes of each
# name -> (fixture, family, has a dummy-prefix space)
TOKENIZERS = {
    "tekken": ("tekken_tok", "tiktoken", False),
    "mistral_sp": ("mistral_sp_tok", "sentencepiece", True),
    "mistral_hf": ("mistral_hf_tok", "hf_sentencepiece", True),
    "bpe": ("bpe_tok", "hf_byte_level", False),
    "sp": ("sp_tok", "sentencepiece", True),
    "llama3": ("llama3_tok", "hf_byte_level", False),
    "gemma_sp": ("gemma_sp_tok", "sentencepiece", False),
    "gemma_hf": ("gemma_hf_tok", "hf_sentencepiece", False),
}
SENTENCEPIECE_FAMILIES = {"sentencepiece", "hf_sentencepiece"}


class Case:
    """One tokenizer under test: the tokenizer, its TokenBytes, its family, whether it has a
    dummy-prefix space."""

    def __init__(self, name, tok, tb, family, dummy_prefix):
        self.name, self.tok, self.tb, self.family, self.dummy_prefix = name, tok, tb, family, dummy_prefix

    @property
    def sentencepiece_like(self) -> bool:
        return self.family in SENTENCEPIECE_FAMILIES

    def reference_ids(self, text: str) -> list[int]:
        return reference_ids(self.tok, text)


@pytest.fixture(scope="session")
def case_of(request):
    """`case_of(name)` -> `Case`, the TokenBytes built once per session."""
    from bld_scale.tokenize.token_bytes import TokenBytes

    cache: dict = {}

    def get(name: str) -> Case:
        if name not in cache:
            fixture, family, dummy = TOKENIZERS[name]
            tok = request.getfixturevalue(fixture)
            cache[name] = Case(name, tok, TokenBytes.from_tokenizer(tok), family, dummy)
        return cache[name]

    return get


def reference_ids(tok, text: str) -> list[int]:
    """The tokenizer's own ids for `text`, plain text only, computed through its own API (not
    through TokenBytes)."""
    import sentencepiece as spm
    import tiktoken

    if isinstance(tok, tiktoken.Encoding):
        return list(tok.encode(text, allowed_special=set(), disallowed_special=()))
    if isinstance(tok, spm.SentencePieceProcessor):
        return list(tok.encode_as_ids(text))
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
