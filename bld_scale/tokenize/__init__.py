"""Tokenizers as bytes: the exact bytes of every vocabulary row, the sorted-vocabulary index, and the
real offline tokenizers (Mistral's, and ones trained here)."""
from bld_scale.tokenize.token_bytes import TokenBytes

__all__ = ["TokenBytes"]
