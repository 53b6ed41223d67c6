"""Which Unicode normal forms a tokenizer applies to text before it tokenizes.

Only the Unicode forms (NFC, NFD, NFKC, NFKD) are named here: text already in that form passes
such a normaliser unchanged, so `data.normalize` can make it harmless (`bld_scale.data.normalize`).
SentencePiece's `nmt_nfkc` / `nfkc` rules and Hugging Face's `Precompiled` normaliser (the same
SentencePiece character maps) count as NFKC. Other rewrites (lowercasing, accent stripping) are
left to the byte-exact check of every encoding.
"""
from __future__ import annotations

import json

FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def _walk(spec) -> list[dict]:
    if not spec:
        return []
    parts = [spec]
    for sub in spec.get("normalizers") or []:
        parts.extend(_walk(sub))
    return parts


def _sentencepiece_form(proto_bytes: bytes) -> tuple[str, ...]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    name = proto.normalizer_spec.name or ""
    return ("NFKC",) if "nfkc" in name.lower() else ()


def normal_forms(tok) -> tuple[str, ...]:
    """The Unicode forms `tok` (Hugging Face, SentencePiece or tiktoken) normalises text to."""
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover - sentencepiece is a requirement
        spm = None
    if spm is not None and isinstance(tok, spm.SentencePieceProcessor):
        return _sentencepiece_form(tok.serialized_model_proto())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str()).get("normalizer")
        forms = []
        for part in _walk(spec):
            kind = part.get("type")
            form = "NFKC" if kind == "Precompiled" else kind
            if form in FORMS and form not in forms:
                forms.append(form)
        return tuple(forms)
    sp_model = getattr(tok, "sp_model", None)  # a slow Hugging Face SentencePiece tokenizer
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        return _sentencepiece_form(sp_model.serialized_model_proto())
    return ()  # tiktoken and others: no normaliser
