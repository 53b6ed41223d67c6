"""Exact token-to-bytes tables for every tokenizer family.

`TokenBytes` answers two questions for one tokenizer, exactly:

* which raw bytes each vocabulary row stands for (`token_bytes(i)`), and
* which byte span of a text each token of its canonical tokenization covers (`encode(text)`).

Supported tokenizers: Hugging Face (`PreTrainedTokenizerBase`: byte-level BPE such as GPT-2,
Llama-3 and Qwen2, and SentencePiece-derived ones such as Llama-2, Mistral and Gemma),
`sentencepiece.SentencePieceProcessor` and `tiktoken.Encoding`.

Every encoding is checked: the tokens' bytes must rebuild the text exactly (allowing only the
SentencePiece-style dummy-prefix space in front). A tokenizer that changes the text (an NFKC
normaliser, a literal ``▁`` under SentencePiece, an unknown-token fallback) raises `ValueError`
naming the tokenizer and the first offending byte offset; it never misaligns silently.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

from bld_scale.tokenize.normal_forms import normal_forms

SP_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_decoder_table() -> dict[str, int]:
    """Inverse of the byte-to-unicode map used by byte-level BPE (GPT-2 and descendants).

    That map sends the 188 printable Latin-1 bytes to themselves and the remaining 68 bytes
    (controls, space, a few Latin-1 gaps), in increasing order, to code points 256, 257, ...
    so that every byte has a visible, non-whitespace character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    keep = set(printable)
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def sentencepiece_piece_bytes(piece: str) -> bytes:
    """Bytes of one SentencePiece piece: ``<0xNN>`` is that byte, ``▁`` is a space."""
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace(SP_SPACE, " ").encode("utf-8")


def text_to_bytes(text: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected text as str, got {type(text).__name__}; decode bytes "
                        "with .decode('utf-8') first")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name}: the text is not valid Unicode ({err.reason} at character {err.start}: "
            f"{text[err.start:err.end]!r}); lone surrogates have no UTF-8 bytes. Clean the text, "
            "e.g. text.encode('utf-8', 'replace').decode('utf-8')") from None


@dataclass
class TokenBytes:
    """Bytes of every row of a model's vocabulary, and byte-exact canonical encoding.

    Build with `TokenBytes.from_tokenizer(tok, vocab_size=None)`.
    """

    name: str
    table: list  # list[bytes | None], one entry per tokenizer id
    vocab_size: int  # rows of the model's vocabulary (>= len(table)); padding rows have no bytes
    _encode_ids: Callable[[str], list[int]] = field(repr=False)
    unk_id: int | None = None
    hint: str = ""  # what this tokenizer is known to do to text (normaliser), for error messages
    _encode_batch: Callable[[list], list] | None = field(default=None, repr=False)  # the tokenizer's own batch call
    normal_forms: tuple = ()  # Unicode forms its normaliser applies ("NFKC", ...): see tokenize.normal_forms

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizer(cls, tok, vocab_size: int | None = None, name: str | None = None) -> "TokenBytes":
        """Tables for a Hugging Face, SentencePiece or tiktoken tokenizer.

        `vocab_size` is the number of rows of the model's embedding when it is padded past the
        tokenizer (padding rows get no bytes); smaller than the tokenizer is a `ValueError`.
        """
        builders = [_from_tiktoken, _from_sentencepiece, _from_huggingface]
        for build in builders:
            built = build(tok, name)
            if built is not None:
                table, encode_ids, unk_id, hint, label, encode_batch = built
                break
        else:
            raise TypeError(
                f"unsupported tokenizer type {type(tok).__module__}.{type(tok).__name__}: pass a "
                "Hugging Face PreTrainedTokenizerBase, a sentencepiece.SentencePieceProcessor or "
                "a tiktoken.Encoding")
        rows = len(table) if vocab_size is None else int(vocab_size)
        if rows < len(table):
            raise ValueError(
                f"{label}: vocab_size={rows} is smaller than the tokenizer's {len(table)} ids; "
                "the model cannot embed every token. Use the model's real embedding size "
                f"(>= {len(table)}) or the tokenizer that belongs to this model")
        return cls(name=label, table=table, vocab_size=rows, _encode_ids=encode_ids,
                   unk_id=unk_id, hint=hint, _encode_batch=encode_batch, normal_forms=normal_forms(tok))

    # ------------------------------------------------------------------ lookups
    def token_bytes(self, i: int) -> bytes | None:
        """Raw bytes of row `i`; None for special tokens and padding rows."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"{self.name}: token id {i} outside the vocabulary [0, {self.vocab_size})")
        return self.table[i] if i < len(self.table) else None

    def all_token_bytes(self) -> list:
        """Bytes of every model row (None for specials and padding), length `vocab_size`."""
        return self.table + [None] * (self.vocab_size - len(self.table))

    @cached_property
    def max_token_len(self) -> int:
        """Length in bytes of the longest token: the exact window of the byte conversion."""
        return max((len(b) for b in self.table if b), default=0)

    @cached_property
    def index(self):
        """The sorted-vocabulary index (`bld_scale.vocab_index.SortedVocabIndex`), built once."""
        from bld_scale.tokenize.vocab_index import SortedVocabIndex

        return SortedVocabIndex(self.all_token_bytes())

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Canonical tokenization of `text` (no added special tokens) and byte spans.

        Spans index `text.encode("utf-8")`, are contiguous and run from 0 to its length. A
        SentencePiece dummy-prefix space belongs to the first token's bytes but not to the text,
        so that span is one byte shorter than its token.
        """
        data = text_to_bytes(text, self.name)
        ids = [int(i) for i in self._encode_ids(text)]
        pieces = []
        for pos, i in enumerate(ids):
            piece = self.token_bytes(i) if 0 <= i < self.vocab_size else None
            if piece is None:
                what = "its unknown token" if i == self.unk_id else f"token id {i} that has no bytes"
                raise ValueError(
                    f"{self.name} cannot keep this text byte-exact: token {pos} of its encoding is "
                    f"{what} (near {_context(text, ids, pos)}). The text has characters the "
                    "tokenizer cannot represent; use a tokenizer with byte fallback or byte-level "
                    "BPE, or remove them")
            pieces.append(piece)
        rebuilt = b"".join(pieces)
        skip = 0
        if rebuilt != data:
            if rebuilt[:1] == b" " and rebuilt[1:] == data:
                skip = 1  # the dummy-prefix space of SentencePiece-style tokenizers
            else:
                raise ValueError(self._mismatch_message(text, data, rebuilt))
        spans = []
        pos = -skip
        for piece in pieces:
            start = max(pos, 0)
            pos += len(piece)
            spans.append((start, pos))
        return ids, spans

    def encode_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The tokenizer's own ids for many texts (its batch call where it has one; no checks)."""
        if self._encode_batch is not None:
            return [[int(i) for i in ids] for ids in self._encode_batch(list(texts))]
        return [[int(i) for i in self._encode_ids(t)] for t in texts]

    def _mismatch_message(self, text: str, data: bytes, rebuilt: bytes) -> str:
        def agreement(candidate: bytes) -> int:
            return next((n for n, (a, b) in enumerate(zip(data, candidate)) if a != b),
                        min(len(data), len(candidate)))

        if rebuilt[:1] == b" " and agreement(rebuilt[1:]) > agreement(rebuilt):
            rebuilt = rebuilt[1:]  # compare past the dummy-prefix space
        offset = agreement(rebuilt)
        reasons = []
        if SP_SPACE in text and self.hint.startswith("sentencepiece"):
            reasons.append(f"the text holds a literal '{SP_SPACE}', which SentencePiece reads as a space")
        hint = self.hint.removeprefix("sentencepiece").lstrip(": ")
        if hint:
            reasons.append(hint)
        why = "; ".join(reasons) or "its normaliser or pre-tokenizer changes the text"
        return (f"{self.name} cannot keep this text byte-exact: its tokens rebuild a different "
                f"byte string from offset {offset} on (text {data[offset:offset + 12]!r}, tokens "
                f"{rebuilt[offset:offset + 12]!r}); {why}. Byte-level distillation needs a "
                "tokenizer whose tokens rebuild the text exactly: normalise the text beforehand or "
                "use another tokenizer")


def row_shift(ids: Sequence[int], spans: Sequence[tuple[int, int]], vocab: TokenBytes) -> int:
    """Byte rows of a conversion before the text's byte 0: 1 for a dummy-prefix space, else 0.

    `ids, spans = vocab.encode(text)`; the rows follow the tokens' bytes, the spans the text's.
    """
    if not ids:
        return 0
    first = vocab.token_bytes(ids[0]) or b""
    return len(first) - (spans[0][1] - spans[0][0])


def _context(text: str, ids: Sequence[int], pos: int) -> str:
    return f"token position {pos} of {len(ids)} in a text of {len(text)} characters"


# ---------------------------------------------------------------------- tiktoken
def _from_tiktoken(tok, name):
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is a requirement
        return None
    if not isinstance(tok, tiktoken.Encoding):
        return None
    special = set(tok.special_tokens_set)
    special_ids = {tok.encode_single_token(s) for s in special}
    table = []
    for i in range(tok.n_vocab):
        if i in special_ids:
            table.append(None)
            continue
        try:
            table.append(tok.decode_single_token_bytes(i))
        except KeyError:  # a gap in the ranks
            table.append(None)
    label = name or f"tiktoken.Encoding({tok.name!r})"
    return table, tok.encode_ordinary, None, "", label, tok.encode_ordinary_batch


# ---------------------------------------------------------------------- sentencepiece
def _from_sentencepiece(tok, name):
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(tok, spm.SentencePieceProcessor):
        return None
    table = []
    unk_id = None
    for i in range(tok.get_piece_size()):
        if tok.is_unknown(i):
            unk_id = i
            table.append(None)
        elif tok.is_control(i):
            table.append(None)
        elif tok.is_byte(i):
            table.append(sentencepiece_piece_bytes(tok.id_to_piece(i)))
        else:
            table.append(sentencepiece_piece_bytes(tok.id_to_piece(i)))
    hint = "sentencepiece"
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.serialized_model_proto())
        norm = proto.normalizer_spec
        notes = []
        if norm.name and norm.name != "identity":
            notes.append(f"its normaliser is {norm.name!r}, which rewrites characters")
        if norm.remove_extra_whitespaces:
            notes.append("it removes extra whitespace")
        if not proto.trainer_spec.byte_fallback:
            notes.append("it has no byte fallback, so unseen characters become <unk>")
        if notes:
            hint = "sentencepiece: " + ", ".join(notes)
    except Exception:  # noqa: BLE001 - the proto is only used to explain errors
        pass
    label = name or f"SentencePieceProcessor({tok.get_piece_size()} pieces)"
    return (table, lambda text: tok.encode(text, out_type=int), unk_id, hint, label,
            lambda texts: tok.encode(list(texts), out_type=int))


# ---------------------------------------------------------------------- Hugging Face
def _walk_components(spec) -> list[dict]:
    """Flatten a tokenizer.json component (normalizer, pre_tokenizer, decoder) into parts."""
    if not spec:
        return []
    parts = [spec]
    for key in ("normalizers", "pretokenizers", "decoders"):
        for sub in spec.get(key) or []:
            parts.extend(_walk_components(sub))
    return parts


def _hf_family(tok) -> tuple[str, str]:
    """('byte_level' | 'sentencepiece', normaliser hint) for a Hugging Face tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        if getattr(tok, "sp_model", None) is not None:
            return "sentencepiece", "sentencepiece"
        raise TypeError(f"{type(tok).__name__}: a slow Hugging Face tokenizer without a "
                        "SentencePiece model is not supported; load its fast version")
    spec = json.loads(backend.to_str())
    parts = (_walk_components(spec.get("normalizer")) + _walk_components(spec.get("pre_tokenizer"))
             + _walk_components(spec.get("decoder")))
    types = {p.get("type") for p in parts}
    norms = [p.get("type") for p in _walk_components(spec.get("normalizer"))
             if p.get("type") in {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents",
                                  "BertNormalizer", "Precompiled"}]
    hint = f"its normaliser applies {', '.join(norms)}" if norms else ""
    if "ByteLevel" in types:
        return "byte_level", hint
    model_type = (spec.get("model") or {}).get("type")
    replaces_space = any(p.get("type") == "Replace" and SP_SPACE in json.dumps(p, ensure_ascii=False)
                         for p in parts)
    if "Metaspace" in types or replaces_space:
        return "sentencepiece", ("sentencepiece: " + hint) if hint else "sentencepiece"
    raise TypeError(
        f"{getattr(tok, 'name_or_path', '') or type(tok).__name__}: the tokenizer (model {model_type}) "
        "is neither byte-level BPE nor SentencePiece-style, so its tokens have no defined bytes "
        "(WordPiece and similar drop spaces); use a byte-level or SentencePiece tokenizer")


def _from_huggingface(tok, name):
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(tok, PreTrainedTokenizerBase):
        return None
    label = name or f"Hugging Face {type(tok).__name__}({getattr(tok, 'name_or_path', '') or 'in memory'})"
    family, hint = _hf_family(tok)
    vocab = tok.get_vocab()
    size = max(len(tok), max(vocab.values(), default=-1) + 1)
    strings: list[str | None] = [None] * size
    for piece, i in vocab.items():
        strings[i] = piece
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    special_ids = set(tok.all_special_ids)
    special_ids.update(i for i, t in added.items() if getattr(t, "special", False))
    added_plain = {i: t.content for i, t in added.items() if i not in special_ids}
    unk_id = tok.unk_token_id
    if family == "byte_level":
        decode_table = byte_level_decoder_table()

        def piece_bytes(piece: str) -> bytes:
            try:
                return bytes(decode_table[ch] for ch in piece)
            except KeyError as err:
                raise ValueError(f"{label}: vocabulary piece {piece!r} has character {err.args[0]!r} "
                                 "outside the byte-level alphabet") from None
    else:
        piece_bytes = sentencepiece_piece_bytes
    table: list[bytes | None] = []
    for i, piece in enumerate(strings):
        if i in special_ids or piece is None:
            table.append(None)
        elif i in added_plain:
            table.append(added_plain[i].encode("utf-8"))  # added tokens are stored as plain text
        else:
            table.append(piece_bytes(piece))

    def encode_ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None

    def encode_batch(texts: list) -> list:
        if not texts:
            return []
        if backend is None or not hasattr(backend, "encode_special_tokens"):
            return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # the Rust tokenizer itself: what `tok(...)` does, without its per-text Python wrapping
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True  # = split_special_tokens: special-looking text is text
        try:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = saved

    return table, encode_ids, unk_id, hint, label, encode_batch
