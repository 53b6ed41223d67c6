"""Bits per byte: the tokenizer-agnostic measure every model in bld_scale is compared with.

BPB = total negative log-likelihood in nats / (text bytes * ln 2). For a teacher we report it
twice on the same text: from its own token probabilities (token-level BPB) and from the byte
distributions of `byte_logprobs` (byte-level BPB); their difference is the conversion gap, a
diagnostic of the conversion (negative is expected: the byte level sums over tokenizations, and
the one-pass rules leak some boundary information, which lowers it further).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from bld_scale.convert.one_pass import byte_logprobs, row_shift
from bld_scale.tokenize.token_bytes import TokenBytes

LN2 = math.log(2.0)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise ValueError("bits per byte needs at least one text byte")
    return float(nll_nats) / (n_bytes * LN2)


def token_nll(logprobs: torch.Tensor, ids: Sequence[int]) -> float:
    """-sum_k log p_k(t_k) in nats, from `[L + 1, V]` (or `[L, V]`) log-probabilities."""
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=logprobs.device)
    return float(-logprobs[torch.arange(len(ids), device=logprobs.device), idx].double().sum())


def byte_nll(byte_lp: torch.Tensor, data: bytes) -> float:
    """-sum_n log q_n(x_n) in nats over the rows of `byte_logprobs` (token bytes `data`)."""
    if byte_lp.shape[0] != len(data) + 1:
        raise ValueError(f"byte_lp has {byte_lp.shape[0]} rows for {len(data)} bytes; expected N + 1")
    idx = torch.as_tensor(list(data), dtype=torch.long, device=byte_lp.device)
    return float(-byte_lp[torch.arange(len(data), device=byte_lp.device), idx].double().sum())


@dataclass
class TeacherBPB:
    token_bpb: float
    byte_bpb: float
    n_bytes: int

    @property
    def gap(self) -> float:
        """Byte-level minus token-level BPB: the conversion's own diagnostic."""
        return self.byte_bpb - self.token_bpb


def teacher_bpb(logprobs: torch.Tensor, text: str, vocab: TokenBytes, *, eos_id: int | None = None,
                mode: str = "cover") -> TeacherBPB:
    """Token-level and byte-level BPB of a teacher on `text` from its `[L + 1, V]` log-probs.

    Both count the same bytes: the text's (a dummy-prefix space is in the first token, and so in
    both numerators, but not in the denominator).
    """
    ids, spans = vocab.encode(text)
    q = byte_logprobs(logprobs, ids, vocab, eos_id=eos_id, mode=mode)
    data = b"".join(vocab.token_bytes(i) for i in ids)
    n_text = len(data) - row_shift(ids, spans, vocab)
    return TeacherBPB(token_bpb=bits_per_byte(token_nll(logprobs, ids), n_text),
                      byte_bpb=bits_per_byte(byte_nll(q, data), n_text), n_bytes=n_text)
