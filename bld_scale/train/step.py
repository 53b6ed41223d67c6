"""One engine-agnostic distillation step: teacher forward, conversion, student forward, loss.

The step never sees DeepSpeed: the teacher is any callable `(input_ids, attention_mask) ->
logits` (a Hugging Face model, or the pipeline's ZeRO-3 inference engine) and the student any
module returning `(token_logits, byte_logits)` (a `Student` or the engine wrapping it). The
caller runs backward and the optimizer, so a plain loop and the DeepSpeed pipeline share it.

Methods (`distill.method`), each weighted by `lambda_kl` on top of the student's token CE:
- `ce`: the student alone.
- `token_kd`: token-level forward KL at every position (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network"); same tokenizer only.
- `uld`: Universal Logit Distillation (Boizard et al. 2024): L1 between sorted probability
  vectors, at positions where both models predict a token starting at the same byte offset.
- `bld`: byte-level distillation (Singh et al. 2026): `CE + lambda_b * CE(bytes) + lambda_kl *
  D(q || p_head)` with `q` the teacher's next-byte distributions (`bld_scale.byteconv`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bld_scale.convert.one_pass import byte_logprobs_batch, pad_byte_rows
from bld_scale.data.batch import DistillBatch
from bld_scale.train.losses import bld_loss, gather_teacher_rows, token_ce, token_kd_loss, uld_loss
from bld_scale.tokenize.token_bytes import TokenBytes

METHODS = ("ce", "token_kd", "uld", "bld")
TeacherForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepSettings:
    method: str = "bld"
    lambda_b: float = 1.0
    lambda_kl: float = 0.1
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    conversion: str = "cover"
    teacher_eos_id: int | None = None
    exact_chunk_tokens: int = 16384  # query positions per tree forward of conversion "exact"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown distill.method {self.method!r}; choose one of {', '.join(METHODS)}")


def check_same_tokenizer(teacher: TokenBytes, student: TokenBytes) -> None:
    """token_kd compares distributions id by id: both sides must be the same vocabulary."""
    same = teacher.table == student.table
    if not same:
        raise ValueError(
            f"distill.method=token_kd needs the teacher and the student to share one tokenizer, but "
            f"{teacher.name} ({len(teacher.table)} ids) and {student.name} ({len(student.table)} ids) "
            "differ; use method 'bld' (or 'uld') for a cross-tokenizer pair")


def teacher_logprobs(teacher_forward: TeacherForward, batch: DistillBatch) -> torch.Tensor:
    with torch.no_grad():
        logits = teacher_forward(batch.teacher_input_ids, batch.teacher_attention_mask)
        logits = getattr(logits, "logits", logits)
        return torch.log_softmax(logits.float(), dim=-1)


def uld_pairs(batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (student position, teacher row) pairs that predict a token at the same byte offset."""
    s_starts, t_starts = batch.student_starts, batch.teacher_starts
    B, J = s_starts.shape
    L1 = t_starts.shape[1]
    # Offsets are unique within a sequence on each side, so a dense match table is small.
    match = (s_starts.unsqueeze(2) == t_starts.unsqueeze(1)) & (s_starts.unsqueeze(2) >= 0)
    b, j, k = torch.nonzero(match, as_tuple=True)
    return b * J + j, b * L1 + k


def exact_byte_targets(teacher_model, batch: DistillBatch, vocab: TokenBytes, eos_id: int | None, *,
                       max_tokens: int = 16384, agree_forwards: Callable[[int], int] | None = None):
    """Exact next-byte targets: per text, tree-masked teacher forwards that carry the canonical
    tokens too (no separate one-pass forward), at most `max_tokens` query positions each.

    The number of forwards depends on the text. A sharded (ZeRO-3) teacher needs every rank to
    make the same calls in the same order, so the forwards are counted first (the contexts and
    their chunking need no model), `agree_forwards(n)` (the pipeline's: the maximum of `n` over
    ranks, itself a collective, so it comes before any forward) says how many to make, and the
    missing ones are one-token forwards whose output is dropped. Without it nothing is padded.
    """
    from bld_scale.convert.exact import byte_logprobs_exact, exact_contexts, tree_forwards

    contexts = [exact_contexts(ids, vocab) for ids in batch.teacher_ids]
    forwards = sum(tree_forwards(ctx, len(ids), max_tokens=max_tokens)
                   for ctx, ids in zip(contexts, batch.teacher_ids))
    target = forwards if agree_forwards is None else agree_forwards(forwards)
    rows, made = [], 0
    for b, (ids, ctx) in enumerate(zip(batch.teacher_ids, contexts)):
        info: dict = {}
        rows.append(byte_logprobs_exact(None, ids, vocab, teacher=teacher_model, eos_id=eos_id,
                                        bos_id=int(batch.teacher_input_ids[b, 0]), max_tokens=max_tokens,
                                        contexts=ctx, info=info))
        made += info["forwards"]
    if made != forwards:  # the count the ranks agreed on must be the count made
        raise RuntimeError(f"exact conversion made {made} teacher forwards but planned {forwards}")
    with torch.no_grad():
        for _ in range(target - forwards):
            teacher_model(input_ids=batch.teacher_input_ids[:1, :1])
    return pad_byte_rows(rows)


def distill_step(teacher_forward: TeacherForward | None, student, batch: DistillBatch,
                 settings: StepSettings, teacher_vocab: TokenBytes | None = None, teacher_model=None,
                 agree_forwards: Callable[[int], int] | None = None):
    """Loss of one batch and the logs of each term (detached).

    `teacher_model` (the module or engine behind `teacher_forward`) is needed by conversion
    "exact", which runs tree-masked forwards; `agree_forwards` keeps their count equal over
    ranks (see `exact_byte_targets`). Returns `(loss, logs)`; logs hold `loss`,
    `loss_ce`, and per method `loss_byte_ce`, `loss_kl`, `loss_uld` or `loss_kd`, plus `tokens`
    and `bytes` counted in the batch.
    """
    method = settings.method
    token_logits, byte_logits = student(input_ids=batch.student_input_ids,
                                        attention_mask=batch.student_attention_mask,
                                        prev_bytes=batch.byte_targets)
    counts = {"tokens": float((batch.student_labels != -100).sum()),
              "bytes": float(batch.n_text_bytes.sum())}
    if method == "ce":
        loss = token_ce(token_logits, batch.student_labels)
        return loss, {"loss": loss.detach(), "loss_ce": loss.detach(), **counts}
    if teacher_forward is None:
        raise ValueError(f"distill.method={method!r} needs a teacher")
    if method == "bld":
        if teacher_vocab is None:
            raise ValueError("method 'bld' needs the teacher's TokenBytes for the conversion")
        if settings.conversion == "exact":
            if teacher_model is None:
                raise ValueError("conversion 'exact' needs the teacher model (teacher_model=...)")
            q, q_mask = exact_byte_targets(teacher_model, batch, teacher_vocab, settings.teacher_eos_id,
                                           max_tokens=settings.exact_chunk_tokens, agree_forwards=agree_forwards)
        else:
            q, q_mask = byte_logprobs_batch(teacher_logprobs(teacher_forward, batch), batch.teacher_ids,
                                            teacher_vocab, eos_id=settings.teacher_eos_id,
                                            mode=settings.conversion)
        rows, row_mask = gather_teacher_rows(q, batch.teacher_rows, q_mask)
        loss, logs = bld_loss(token_logits, batch.student_labels, byte_logits, batch.byte_targets,
                              rows, row_mask, lambda_b=settings.lambda_b, lambda_kl=settings.lambda_kl,
                              divergence=settings.divergence, beta=settings.beta,
                              temperature=settings.temperature)
        return loss, {**{k: v.detach() for k, v in logs.items()}, "loss": loss.detach(), **counts}
    logprobs = teacher_logprobs(teacher_forward, batch)
    ce = token_ce(token_logits, batch.student_labels)
    if method == "token_kd":
        mask = batch.student_labels != -100
        # same tokenizer: teacher row j predicts the same token as student position j
        kd = token_kd_loss(token_logits, logprobs[:, : token_logits.shape[1]], mask,
                           temperature=settings.temperature)
        loss = ce + settings.lambda_kl * kd
        return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_kd": kd.detach(), **counts}
    s_idx, t_idx = uld_pairs(batch)
    s_rows = token_logits.reshape(-1, token_logits.shape[-1])[s_idx]
    t_rows = logprobs.reshape(-1, logprobs.shape[-1])[t_idx]
    uld = uld_loss(s_rows, t_rows, temperature=settings.temperature)
    loss = ce + settings.lambda_kl * uld
    return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_uld": uld.detach(), **counts}


@torch.no_grad()
def student_nll(student, batch: DistillBatch) -> tuple[float, int]:
    """Summed token NLL (nats) of the student over the batch's text, and the text's bytes."""
    token_logits, _ = student(input_ids=batch.student_input_ids,
                              attention_mask=batch.student_attention_mask,
                              prev_bytes=batch.byte_targets)
    nll = token_ce(token_logits, batch.student_labels, reduction="sum")
    return float(nll), int(batch.n_text_bytes.sum())
