"""Text -> both tokenizations with byte spans -> windows -> padded (or packed) `DistillBatch`.

Everything is keyed by byte offsets of the window's UTF-8 text: the student's byte-head slots
and the teacher's byte rows meet at the same offset, whatever the two tokenizers did. Conventions
(docs/DESIGN.md): the teacher sees `[BOS] + t_1..t_L` (L + 1 rows of distributions), the student
sees `[BOS_s] + u_1..u_{J-1}` and predicts `u_1..u_J`; byte slot i of student position j targets
text offset `a_j + i` while `i < min(K, b_j - a_j)`; that offset is teacher byte row
`offset + shift` (shift = 1 under a dummy-prefix teacher).

Two layouts of the same windows: `collate` pads them into one row per window (B rows, attention
masks); `bld_scale.data.packing.pack` concatenates them into ONE row per model without padding
(`DistillBatch.packing` set, masks None, position ids restarting at each window's BOS).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from bld_scale.tokenize.token_bytes import TokenBytes, row_shift

IGNORE = -100


def resolve_bos(tok, override: str | None = None) -> tuple[int, str]:
    """The id the model gets in front of a text, and where it came from (for the log).

    A configured token wins; otherwise the tokenizer's BOS, else its EOS (GPT-2 style models
    train with <|endoftext|> between documents).
    """
    if override is not None:
        ids = tok.convert_tokens_to_ids([override]) if hasattr(tok, "convert_tokens_to_ids") else [None]
        if ids[0] is None or ids[0] == getattr(tok, "unk_token_id", None):
            raise ValueError(f"configured BOS token {override!r} is not in the tokenizer's vocabulary")
        return int(ids[0]), f"configured token {override!r}"
    for attr in ("bos_token", "eos_token"):
        token_id = getattr(tok, f"{attr}_id", None)
        if token_id is not None:
            return int(token_id), f"the tokenizer's {attr} {getattr(tok, attr)!r}"
    raise ValueError("the tokenizer has neither a BOS nor an EOS token: set teacher.bos_token / "
                     "student.bos_token in the recipe to a token of its vocabulary")


def split_windows(text: str, window_bytes: int) -> list[str]:
    """Cut `text` into consecutive windows of at most `window_bytes` UTF-8 bytes.

    Cuts fall after a newline when one is in the second half of the window, else after a space,
    else at a character boundary: never inside a UTF-8 character, and nothing is dropped
    (`"".join(windows) == text`).
    """
    if window_bytes < 8:
        raise ValueError(f"window_bytes={window_bytes} is too small; use at least a few hundred")
    windows, pos = [], 0
    data = text.encode("utf-8")
    while pos < len(data):
        end = min(pos + window_bytes, len(data))
        if end < len(data):
            while end > pos and (data[end] & 0xC0) == 0x80:  # back off to a character start
                end -= 1
            for sep in (b"\n", b" "):
                cut = data.rfind(sep, pos + window_bytes // 2, end)
                if cut >= 0:
                    end = cut + 1
                    break
        windows.append(data[pos:end].decode("utf-8"))
        pos = end
    return windows


@dataclass
class Example:
    """One window, tokenized by both sides, with spans in the window's bytes."""

    text_bytes: bytes
    teacher_ids: list[int]
    teacher_shift: int
    teacher_starts: list[int]  # text offset where each teacher token starts (clamped at 0)
    student_ids: list[int]
    student_spans: list[tuple[int, int]]


class PairTokenizer:
    """Tokenizes windows for a teacher and a student, keeping only byte-exact pairs."""

    def __init__(self, teacher: TokenBytes, student: TokenBytes):
        self.teacher, self.student = teacher, student

    def __call__(self, text: str) -> Example:
        if not text:
            raise ValueError("empty text window: nothing to distil (filter empty documents out)")
        t_ids, t_spans = self.teacher.encode(text)
        s_ids, s_spans = self.student.encode(text)
        return Example(text_bytes=text.encode("utf-8"), teacher_ids=t_ids,
                       teacher_shift=row_shift(t_ids, t_spans, self.teacher),
                       teacher_starts=[s for s, _ in t_spans], student_ids=s_ids,
                       student_spans=list(s_spans))


@dataclass
class PackedLayout:
    """Where each of the B windows of a packed `DistillBatch` sits in its one row.

    `*_bounds` hold B + 1 increasing offsets: window b is `[bounds[b], bounds[b + 1])`. Teacher
    rows are `[BOS] + t_1..t_L` of each window (L + 1 each), student positions `[BOS_s] +
    u_1..u_{J-1}` (J each), byte rows the windows' conversions laid end to end (each
    `len(text) + shift + 1` rows, as `bld_scale.convert` returns them for that window alone).
    """

    teacher_position_ids: torch.Tensor  # [1, T]: 0..L per window
    student_position_ids: torch.Tensor  # [1, S]: 0..J-1 per window
    student_window: torch.Tensor  # [1, S]: the window of each student position
    byte_row_base: torch.Tensor  # [B]: first packed byte row of each window
    teacher_bounds: list[int]
    student_bounds: list[int]
    byte_row_bounds: list[int]

    def to(self, device) -> "PackedLayout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedLayout(**moved)


@dataclass
class DistillBatch:
    """Padded (`collate`: B rows) or packed (`packing.pack`: one row, `packing` set) windows.

    Shapes below are the padded layout's; a packed batch has one row of T = sum(L_b + 1) teacher
    and S = sum(J_b) student positions in their place, attention masks None (the forwards get
    position ids instead: `student_inputs`, `convert.dispatch.teacher_token_logprobs`), per-window fields
    (`teacher_ids`, `teacher_shift`, `n_text_bytes`) still per window. Offsets stay the window's
    own text offsets in both layouts.
    """

    teacher_input_ids: torch.Tensor  # [B, L_max + 1]: BOS + canonical teacher tokens
    teacher_attention_mask: torch.Tensor | None
    teacher_ids: list  # B lists of canonical teacher tokens (for the conversion)
    teacher_shift: torch.Tensor  # [B]: teacher byte row = text offset + shift
    teacher_starts: torch.Tensor  # [B, L_max + 1]: text offset each teacher row predicts from (-1 pad)
    student_input_ids: torch.Tensor  # [B, J_max]: BOS_s + u_1..u_{J-1}
    student_attention_mask: torch.Tensor | None
    student_labels: torch.Tensor  # [B, J_max]: u_1..u_J, IGNORE on padding
    student_starts: torch.Tensor  # [B, J_max]: text offset where the predicted token starts (-1 pad)
    byte_targets: torch.Tensor  # [B, J_max, K]: true byte of each head slot, IGNORE when masked
    byte_offsets: torch.Tensor  # [B, J_max, K]: text offset of each head slot, -1 when masked
    n_text_bytes: torch.Tensor  # [B]
    packing: PackedLayout | None = None  # set by `packing.pack`: the windows share one row

    def to(self, device) -> "DistillBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
            elif isinstance(value, PackedLayout):
                moved[name] = value.to(device)
        return DistillBatch(**moved)

    @property
    def teacher_rows(self) -> torch.Tensor:
        """[B, J_max, K] teacher byte row of each head slot (-1 when masked).

        Packed: `[1, S, K]` rows of the packed conversion (each window's rows start at its
        `byte_row_base`).
        """
        if self.packing is None:
            shift = self.teacher_shift.view(-1, 1, 1)
        else:
            shift = (self.teacher_shift + self.packing.byte_row_base)[self.packing.student_window].unsqueeze(-1)
        rows = self.byte_offsets + shift
        return torch.where(self.byte_offsets >= 0, rows, torch.full_like(rows, -1))

    def student_inputs(self) -> dict:
        """Keyword arguments of the student's forward (without `prev_bytes`).

        Packed: no attention mask and the position ids, from which transformers builds a
        block-diagonal causal mask (FlashAttention-2: its variable-length path), so attention
        stays inside each window.
        """
        if self.packing is None:
            return {"input_ids": self.student_input_ids, "attention_mask": self.student_attention_mask}
        return {"input_ids": self.student_input_ids, "attention_mask": None,
                "position_ids": self.packing.student_position_ids}

    def window_origin(self, b: int) -> tuple[int, int, int]:
        """(row, first teacher row, first byte row) of window b: (b, 0, 0) when padded."""
        if self.packing is None:
            return b, 0, 0
        return 0, self.packing.teacher_bounds[b], self.packing.byte_row_bounds[b]


def collate(examples: Sequence[Example], K: int, teacher_bos: int, student_bos: int,
            teacher_pad: int | None = None, student_pad: int | None = None) -> DistillBatch:
    """Pad a list of examples into a `DistillBatch` (right padding, masks for everything)."""
    B = len(examples)
    t_pad = teacher_bos if teacher_pad is None else teacher_pad
    s_pad = student_bos if student_pad is None else student_pad
    l_max = max(len(e.teacher_ids) for e in examples) + 1
    j_max = max(max(len(e.student_ids) for e in examples), 1)
    t_in = torch.full((B, l_max), t_pad, dtype=torch.long)
    t_mask = torch.zeros((B, l_max), dtype=torch.long)
    t_starts = torch.full((B, l_max), -1, dtype=torch.long)
    s_in = torch.full((B, j_max), s_pad, dtype=torch.long)
    s_mask = torch.zeros((B, j_max), dtype=torch.long)
    labels = torch.full((B, j_max), IGNORE, dtype=torch.long)
    s_starts = torch.full((B, j_max), -1, dtype=torch.long)
    byte_targets = torch.full((B, j_max, K), IGNORE, dtype=torch.long)
    byte_offsets = torch.full((B, j_max, K), -1, dtype=torch.long)
    for b, ex in enumerate(examples):
        L, J = len(ex.teacher_ids), len(ex.student_ids)
        t_in[b, : L + 1] = torch.tensor([teacher_bos] + ex.teacher_ids)
        t_mask[b, : L + 1] = 1
        # row k predicts the token starting at teacher_starts[k]; row L predicts past the end
        t_starts[b, : L + 1] = torch.tensor(ex.teacher_starts + [len(ex.text_bytes)])
        if J:
            s_in[b, :J] = torch.tensor([student_bos] + ex.student_ids[:-1])
            s_mask[b, :J] = 1
            labels[b, :J] = torch.tensor(ex.student_ids)
            s_starts[b, :J] = torch.tensor([a for a, _ in ex.student_spans])
        data = ex.text_bytes
        for j, (a, end) in enumerate(ex.student_spans):
            n = min(K, end - a)
            if n > 0:
                byte_targets[b, j, :n] = torch.tensor(list(data[a:a + n]))
                byte_offsets[b, j, :n] = torch.arange(a, a + n)
    n_bytes = torch.tensor([len(e.text_bytes) for e in examples], dtype=torch.long)
    return DistillBatch(
        teacher_input_ids=t_in, teacher_attention_mask=t_mask,
        teacher_ids=[list(e.teacher_ids) for e in examples],
        teacher_shift=torch.tensor([e.teacher_shift for e in examples], dtype=torch.long),
        teacher_starts=t_starts, student_input_ids=s_in, student_attention_mask=s_mask,
        student_labels=labels, student_starts=s_starts, byte_targets=byte_targets,
        byte_offsets=byte_offsets, n_text_bytes=n_bytes)

