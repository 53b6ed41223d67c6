"""DSKD with cross-model attention (Zhang et al. 2024, "Dual-Space Knowledge Distillation for LLMs").

Cross-model attention (CMA) aligns the two token sequences of a window softly. Queries are the
student's token embeddings of [input; target] projected to the teacher's embedding width
(`DualSpaceProjectors.query`); keys are the teacher's [input; target] token embeddings,
normalised by their standard deviation. Scores `Q K^T / sqrt(2 d_t)` give two attentions:
- t->s (softmax over teacher rows, per student position): teacher hidden states (normalised,
  projected by `teacher_to_student`) mixed into the student's space; through the student's own
  LM head they give p_{t->s}, trained to predict the student's targets (CE_t2s), and the student
  learns KL(p_{t->s} || p_s) in its own space.
- s->t (softmax over student positions, per teacher row): the student's hidden states projected
  by `student_to_teacher`, mixed into the teacher's space; through the teacher's frozen head they
  give p_{s->t}, and the student learns KL(p_t || p_{s->t}) in the teacher's space.

`dskd_terms` returns the three terms; `train.step` adds `CE_t2s + lambda_kl * (KD_s + KD_t)` to the
student's token CE.

Choices the paper leaves open (ours):
- CE_t2s trains the projectors only: the student's embeddings (queries) and LM-head weights enter
  it detached, so it is weighted 1 and does not trade against the student's losses.
- KD in the student's space counts only positions where p_{t->s} predicts the target (argmax),
  as an unreliable projection would teach noise (what the authors' released training does, we
  believe; the paper motivates it); p_{t->s} is a fixed target there (detached).
- Normalisation divides by the standard deviation over the window's valid entries (detached).
- Attention spans the whole window (both directions, no causal mask) over valid rows only: the
  teacher's rows that predict a token and the student's positions that have a label.
- Forward KL in both spaces at temperature `distill.temperature` (times T^2).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from bld_scale.model.projectors import DualSpaceProjectors
from bld_scale.train.losses import byte_divergence, token_ce

MASKED_SCORE = -1e9  # not -inf: a row with nothing to attend to stays finite (and is masked later)


def _weight_dtype(layer: torch.nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def _std_normalised(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x / x[mask].float().std().clamp(min=1e-6).detach()


def through_frozen_weights(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with gradients to `x` only, none to the layer's weights.

    The layer is called as a module (never its `.weight` read directly), so a ZeRO-3 engine
    gathers a partitioned weight as for any forward. For a linear layer the first two terms cancel
    exactly in value and in their weight gradient, leaving x's gradient; the third carries the value.
    """
    fixed = x.detach()
    return layer(x) - layer(fixed) + layer(fixed).detach()


def cross_model_attention(query: torch.Tensor, keys: torch.Tensor, student_mask: torch.Tensor,
                          teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(a_t2s [B,J,L], a_s2t [B,L,J])` from queries `[B,J,D]`, keys `[B,L,D]` and the valid rows."""
    scores = query.float() @ keys.float().transpose(1, 2) / math.sqrt(keys.shape[-1])
    t2s = scores.masked_fill(~teacher_mask.unsqueeze(1), MASKED_SCORE).softmax(-1)
    s2t = scores.transpose(1, 2).masked_fill(~student_mask.unsqueeze(1), MASKED_SCORE).softmax(-1)
    return t2s, s2t


def dskd_terms(projectors: DualSpaceProjectors, *, student_hidden: torch.Tensor, student_logits: torch.Tensor,
               student_input_embeds: torch.Tensor, student_target_embeds: torch.Tensor,
               student_head: torch.nn.Module, student_labels: torch.Tensor,
               teacher_hidden: torch.Tensor, teacher_logprobs: torch.Tensor,
               teacher_input_embeds: torch.Tensor, teacher_target_embeds: torch.Tensor,
               teacher_mask: torch.Tensor, teacher_head: torch.nn.Module,
               temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """`kd_student`, `kd_teacher`, `ce_t2s` and `t2s_accuracy` of a padded batch.

    Student tensors are `[B, J, .]` (labels -100 where none), teacher tensors `[B, L, .]`,
    `teacher_mask [B, L]` the rows that predict a teacher token. `student_head` and `teacher_head`
    (the two linear LM heads) map hidden states to logits; the student head's weights get no
    gradient here, the teacher's are frozen by its owner (gradients reach its input only).
    """
    student_mask = student_labels != -100
    dtype = projectors.query.weight.dtype
    query = projectors.query(torch.cat([student_input_embeds, student_target_embeds], -1).detach().to(dtype))
    keys = _std_normalised(torch.cat([teacher_input_embeds, teacher_target_embeds], -1), teacher_mask).detach()
    a_t2s, a_s2t = cross_model_attention(query, keys, student_mask, teacher_mask)

    values_t = projectors.teacher_to_student(_std_normalised(teacher_hidden.detach().to(dtype), teacher_mask))
    t2s_hidden = (a_t2s.to(dtype) @ values_t).to(_weight_dtype(student_head))
    t2s_logits = through_frozen_weights(student_head, t2s_hidden).float()
    ce_t2s = token_ce(t2s_logits, student_labels)
    correct = student_mask & (t2s_logits.argmax(-1) == student_labels)
    t2s_logq = torch.log_softmax(t2s_logits.detach(), -1)
    kd_student = byte_divergence(t2s_logq, student_logits, correct, "forward_kl", temperature=temperature)

    values_s = projectors.student_to_teacher(student_hidden.to(dtype))
    s2t_logits = teacher_head((a_s2t.to(dtype) @ values_s).to(_weight_dtype(teacher_head))).float()
    kd_teacher = byte_divergence(teacher_logprobs.detach().float(), s2t_logits, teacher_mask, "forward_kl",
                                 temperature=temperature)
    accuracy = correct.sum() / student_mask.sum().clamp(min=1)
    return {"kd_student": kd_student, "kd_teacher": kd_teacher, "ce_t2s": ce_t2s,
            "t2s_accuracy": accuracy.detach().float()}


def teacher_targets(teacher_input_ids: torch.Tensor, teacher_attention_mask: torch.Tensor | None,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(targets [B, L+1], mask)`: row k's target is input k + 1; the last row of each window has none."""
    B, L1 = teacher_input_ids.shape
    valid = torch.ones_like(teacher_input_ids, dtype=torch.bool) if teacher_attention_mask is None \
        else teacher_attention_mask.bool()
    mask = torch.zeros_like(valid)
    mask[:, :-1] = valid[:, 1:]
    targets = F.pad(teacher_input_ids[:, 1:], (0, 1), value=pad_id)
    return torch.where(mask, targets, torch.full_like(targets, pad_id)), mask
