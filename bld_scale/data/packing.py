"""Packed windows: a micro-batch's windows laid end to end in ONE row per model, no padding.

Each window keeps its own `[BOS] + tokens` on both sides and its position ids restart at 0 at
that BOS, so every window sees exactly what it sees alone in a padded batch (`batch.collate`):
the packed row is a layout change only, and losses (means over tokens and byte slots), gradients
and teacher targets equal the padded batch's up to float rounding (tests/unit/test_packing.py).

How attention stays inside a window: the forwards get `position_ids` and NO attention mask
(`DistillBatch.student_inputs`, `bld_scale.convert.dispatch.teacher_token_logprobs`). transformers (5.x) then finds the windows
from the position ids (`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal
causal mask for SDPA / eager attention, and FlashAttention-2 takes its variable-length path from
the same position ids (only for one row per forward, hence one row per micro-batch here). Both
need the forward to run without a KV cache (`use_cache=False`): a cache turns the detection
off. A transformers without `find_packed_sequence_indices` is refused (`require_packed_attention`).

The teacher's byte targets are converted window by window on the window's own slice of the
packed log-probabilities (its BOS row first), so they are the padded batch's numbers; the packed
`DistillBatch.teacher_rows` index those rows laid end to end (`PackedLayout.byte_row_bounds`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from bld_scale.data.batch import DistillBatch, Example, PackedLayout, collate


@functools.cache
def require_packed_attention() -> None:
    """Refuse a transformers that would let packed windows attend to each other."""
    try:
        from transformers import masking_utils
    except ImportError as err:  # an older transformers has no masking_utils at all
        raise RuntimeError(_TOO_OLD.format(why=f"transformers.masking_utils does not import ({err})")) from None
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise RuntimeError(_TOO_OLD.format(why="transformers.masking_utils has no find_packed_sequence_indices"))


_TOO_OLD = ("data.pack=true needs a transformers that keeps attention inside packed sequences given their "
            "position ids, but {why}: install transformers 5.x, or set data.pack=false")


def _bounds(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def _positions(lengths: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(int(n)) for n in lengths]).view(1, -1)


def pack(examples: Sequence[Example], K: int, teacher_bos: int, student_bos: int) -> DistillBatch:
    """The examples as one packed row per model (see the module docstring).

    Each window is laid out by `collate` on its own (so exactly as in a padded batch, without
    the padding) and the pieces are concatenated.
    """
    if not examples:
        raise ValueError("pack needs at least one window")
    require_packed_attention()
    alone = [collate([ex], K, teacher_bos, student_bos) for ex in examples]
    t_len = [len(ex.teacher_ids) + 1 for ex in examples]
    s_len = [len(ex.student_ids) for ex in examples]
    if min(s_len) == 0:
        raise ValueError("a window without student tokens cannot be packed (empty windows are refused "
                         "when they are tokenized)")
    byte_rows = [len(ex.text_bytes) + ex.teacher_shift + 1 for ex in examples]

    def cat(name: str, lengths: Sequence[int]) -> torch.Tensor:
        return torch.cat([getattr(one, name)[:, :n] for one, n in zip(alone, lengths)], dim=1)

    byte_row_bounds = _bounds(byte_rows)
    layout = PackedLayout(
        teacher_position_ids=_positions(t_len), student_position_ids=_positions(s_len),
        student_window=torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(s_len)).view(1, -1),
        byte_row_base=torch.tensor(byte_row_bounds[:-1], dtype=torch.long),
        teacher_bounds=_bounds(t_len), student_bounds=_bounds(s_len), byte_row_bounds=byte_row_bounds)
    return DistillBatch(
        teacher_input_ids=cat("teacher_input_ids", t_len), teacher_attention_mask=None,
        teacher_ids=[list(ex.teacher_ids) for ex in examples],
        teacher_shift=torch.tensor([ex.teacher_shift for ex in examples], dtype=torch.long),
        teacher_starts=cat("teacher_starts", t_len),
        student_input_ids=cat("student_input_ids", s_len), student_attention_mask=None,
        student_labels=cat("student_labels", s_len), student_starts=cat("student_starts", s_len),
        byte_targets=cat("byte_targets", s_len), byte_offsets=cat("byte_offsets", s_len),
        n_text_bytes=torch.tensor([len(ex.text_bytes) for ex in examples], dtype=torch.long),
        packing=layout)


@dataclass
class TeacherView:
    """A padded batch's teacher side: what text-by-text teacher code reads."""
    teacher_input_ids: torch.Tensor  # [B, L_max + 1], BOS first, padded with BOS
    teacher_attention_mask: torch.Tensor  # [B, L_max + 1]
    teacher_ids: list
    packing: None = None


def padded_teacher_view(batch: DistillBatch) -> TeacherView:
    """The teacher inputs of a packed batch's windows as a padded batch holds them.

    For code that works window by window on the teacher side (conversion "exact" makes its own
    tree forwards per text), so that it needs no packed variant.
    """
    lay = batch.packing
    ids = batch.teacher_input_ids[0]
    B = len(batch.teacher_ids)
    l_max = max(len(t) for t in batch.teacher_ids) + 1
    t_in = ids[lay.teacher_bounds[:-1]].view(B, 1).repeat(1, l_max)  # each window's BOS
    mask = torch.zeros((B, l_max), dtype=torch.long, device=ids.device)
    for b in range(B):
        start, end = lay.teacher_bounds[b], lay.teacher_bounds[b + 1]
        t_in[b, : end - start] = ids[start:end]
        mask[b, : end - start] = 1
    return TeacherView(t_in, mask, batch.teacher_ids)
