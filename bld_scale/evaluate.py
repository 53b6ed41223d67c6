"""Bits per byte: the tokenizer-agnostic measure every model in bld_scale is compared with.

BPB = total negative log-likelihood in nats / (text bytes * ln 2). For a teacher we report it
twice on the same text: from its own token probabilities (token-level BPB) and from the byte
distributions of `byte_logprobs` (byte-level BPB); their difference is the conversion gap, a
diagnostic of the conversion (negative is expected: the byte level sums over tokenizations, and
the one-pass rules leak some boundary information, which lowers it further).

Batches are measured as sums (`student_nll_sums`, `teacher_nll_sums`) so that the pipeline can
add them over ranks and a tool over its batches before dividing (`bits_per_byte`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from bld_scale.convert.dispatch import TeacherForward, byte_logprobs, teacher_byte_targets
from bld_scale.convert.exact import BATCH_CHUNK_TOKENS
from bld_scale.tokenize.token_bytes import TokenBytes, row_shift
from bld_scale.train.losses import token_ce

LN2 = math.log(2.0)


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
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


@dataclass
class TeacherNllSums:
    """A teacher's summed token-level and byte-level NLL (nats) over some texts, and their bytes."""

    token_nll: float = 0.0
    byte_nll: float = 0.0
    n_bytes: float = 0.0

    def as_list(self) -> list[float]:
        return [self.token_nll, self.byte_nll, self.n_bytes]

    def bpb(self) -> TeacherBPB:
        return TeacherBPB(token_bpb=bits_per_byte(self.token_nll, self.n_bytes),
                          byte_bpb=bits_per_byte(self.byte_nll, self.n_bytes), n_bytes=int(self.n_bytes))


@torch.no_grad()
def student_nll_sums(student, batch) -> tuple[float, int]:
    """Summed token NLL (nats) of the student over the batch's text, and the text's bytes.

    `student` returns `(token_logits, byte_logits)` (a `Student` or an engine around one);
    `batch` is a `DistillBatch` (padded or packed).
    """
    token_logits, _ = student(**batch.student_inputs(), prev_bytes=batch.byte_targets)
    nll = token_ce(token_logits, batch.student_labels, reduction="sum")
    return float(nll), int(batch.n_text_bytes.sum())


@torch.no_grad()
def teacher_nll_sums(teacher_forward: TeacherForward, batch, vocab: TokenBytes, *, conversion: str = "cover",
                     teacher_model=None, eos_id: int | None = None,
                     exact_chunk_tokens: int = BATCH_CHUNK_TOKENS,
                     agree_forwards: Callable[[int], int] | None = None,
                     into: TeacherNllSums | None = None, backend: str = "torch") -> TeacherNllSums:
    """The teacher's token-level and byte-level NLL over a batch's texts, and their bytes.

    Arguments as for `bld_scale.convert.dispatch.teacher_byte_targets` (conversion "exact" needs
    `teacher_model`; a sharded teacher needs `agree_forwards`). Both NLLs count the text's bytes:
    a dummy-prefix space is in the first token, and so in both numerators, but not in the
    denominator (`batch.n_text_bytes`). `into`: sums to add this batch's texts to, one text at a
    time (the same float additions as one running total over every text), and return.
    """
    q, _, logprobs = teacher_byte_targets(batch, vocab, conversion=conversion, teacher_forward=teacher_forward,
                                          teacher_model=teacher_model, eos_id=eos_id,
                                          exact_chunk_tokens=exact_chunk_tokens, agree_forwards=agree_forwards,
                                          with_token_logprobs=True, backend=backend)
    sums = TeacherNllSums() if into is None else into
    for b, ids in enumerate(batch.teacher_ids):
        data = b"".join(vocab.token_bytes(i) for i in ids)
        row, t0, r0 = batch.window_origin(b)  # (b, 0, 0) padded; the window's slices when packed
        sums.token_nll += token_nll(logprobs[row, t0: t0 + len(ids) + 1], ids)
        sums.byte_nll += byte_nll(q[row, r0: r0 + len(data) + 1], data)
        sums.n_bytes += float(batch.n_text_bytes[b])
    return sums


def teacher_bpb(logprobs: torch.Tensor, text: str, vocab: TokenBytes, *, eos_id: int | None = None,
                mode: str = "cover") -> TeacherBPB:
    """Token-level and byte-level BPB of a teacher on one `text` from its `[L + 1, V]` log-probs.

    Both count the same bytes: the text's (a dummy-prefix space is in the first token, and so in
    both numerators, but not in the denominator).
    """
    ids, spans = vocab.encode(text)
    q = byte_logprobs(logprobs, ids, vocab, eos_id=eos_id, mode=mode)
    data = b"".join(vocab.token_bytes(i) for i in ids)
    n_text = len(data) - row_shift(ids, spans, vocab)
    return TeacherBPB(token_bpb=bits_per_byte(token_nll(logprobs, ids), n_text),
                      byte_bpb=bits_per_byte(byte_nll(q, data), n_text), n_bytes=int(n_text))
