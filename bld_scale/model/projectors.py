"""DSKD's trainable projectors (Zhang et al. 2024, "Dual-Space Knowledge Distillation for LLMs").

Held by the `Student` beside its byte head (`Student.projectors`), so they train with the same
optimizer and are saved in the same checkpoints; they are training machinery only, so the
exported student (`model.export`) leaves them out. The loss that uses them is
`bld_scale.train.baselines.dskd`.

- `query`: the student's [input; target] token embeddings (2 * d_s) -> the teacher's key space
  (2 * d_t), for cross-model attention.
- `teacher_to_student`: teacher hidden states (d_t) -> student hidden size (values of t->s).
- `student_to_teacher`: student hidden states (d_s) -> teacher hidden size (values of s->t).
"""
from __future__ import annotations

from torch import nn


class DualSpaceProjectors(nn.Module):
    def __init__(self, student_hidden: int, student_embed: int, teacher_hidden: int, teacher_embed: int):
        super().__init__()
        self.dims = {"student_hidden": student_hidden, "student_embed": student_embed,
                     "teacher_hidden": teacher_hidden, "teacher_embed": teacher_embed}
        self.query = nn.Linear(2 * student_embed, 2 * teacher_embed)
        self.teacher_to_student = nn.Linear(teacher_hidden, student_hidden)
        self.student_to_teacher = nn.Linear(student_hidden, teacher_hidden)
