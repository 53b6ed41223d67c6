"""One engine-agnostic distillation step: teacher forward, conversion, student forward, loss.

The step never sees DeepSpeed: the teacher is any callable `(input_ids, attention_mask) ->
logits` (a Hugging Face model, or the pipeline's ZeRO-3 inference engine; `(input_ids, None,
position_ids)` for a packed batch) and the student any module returning `(token_logits,
byte_logits)` (a `Student` or the engine wrapping it). The caller runs backward and the
optimizer, so a plain loop and the DeepSpeed pipeline share it.

Padded and packed batches (`bld_scale.data.packing`) give the same loss: every term is a mean
over the same tokens, byte slots or pairs, laid out differently.

Methods (`distill.method`), each weighted by `lambda_kl` on top of the student's token CE:
- `ce`: the student alone.
- `token_kd`: token-level forward KL at every position (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network"); same tokenizer only.
- `uld`: Universal Logit Distillation (Boizard et al. 2024): L1 between sorted probability
  vectors, at positions where both models predict a token starting at the same byte offset.
- `mined`: MinED (Wan et al. 2024, FuseLLM): KL to the teacher's top-k mapped to student tokens
  by edit distance, at positions aligned by edit distance (`train.baselines.mined`).
- `dskd`: DSKD with cross-model attention (Zhang et al. 2024): KL in the student's and the
  teacher's spaces through trainable projectors, plus their own CE (`train.baselines.dskd`).
- `alm`: ALM (Minixhofer et al. 2025): binarised KL between the two models' likelihoods of
  chunks that both tokenizations delimit (`train.baselines.alm`).
- `bld`: byte-level distillation (Singh et al. 2026): `CE + lambda_b * CE(bytes) + lambda_kl *
  D(q || p_head)` with `q` the teacher's next-byte distributions (`bld_scale.convert`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from bld_scale.config import DistillConfig
from bld_scale.config.kernels import FUSED_CE_METHODS
from bld_scale.convert.dispatch import TeacherForward, teacher_byte_targets, teacher_token_logprobs
from bld_scale.data.batch import DistillBatch
from bld_scale.train.baselines.terms import alm_term, dskd_term, mined_term, teacher_hidden_and_logprobs
from bld_scale.train.losses import bld_loss, gather_teacher_rows, token_ce, token_kd_loss, uld_loss
from bld_scale.tokenize.token_bytes import TokenBytes

# The recipe's choices for distill.method (checked when a recipe loads; again here for a
# DistillConfig built in code).
METHODS = next(f.metadata["choices"] for f in dataclasses.fields(DistillConfig) if f.name == "method")


# Baselines that align each window's two token sequences themselves: padded batches only.
ALIGNING_METHODS = ("mined", "dskd", "alm")


def check_same_tokenizer(teacher: TokenBytes, student: TokenBytes) -> None:
    """token_kd compares distributions id by id: both sides must be the same vocabulary."""
    same = teacher.table == student.table
    if not same:
        raise ValueError(
            f"distill.method=token_kd needs the teacher and the student to share one tokenizer, but "
            f"{teacher.name} ({len(teacher.table)} ids) and {student.name} ({len(student.table)} ids) "
            "differ; use method 'bld' (or 'uld') for a cross-tokenizer pair")


def uld_pairs(batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (student position, teacher row) pairs that predict a token at the same byte offset."""
    if batch.packing is not None:
        return _packed_uld_pairs(batch)
    s_starts, t_starts = batch.student_starts, batch.teacher_starts
    B, J = s_starts.shape
    L1 = t_starts.shape[1]
    # Offsets are unique within a sequence on each side, so a dense match table is small.
    match = (s_starts.unsqueeze(2) == t_starts.unsqueeze(1)) & (s_starts.unsqueeze(2) >= 0)
    b, j, k = torch.nonzero(match, as_tuple=True)
    return b * J + j, b * L1 + k


def _packed_uld_pairs(batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`uld_pairs` of a packed batch: offsets are per window, so match within each window's slices."""
    lay, s_pairs, t_pairs = batch.packing, [], []
    for b in range(len(batch.teacher_ids)):
        s0, s1 = lay.student_bounds[b], lay.student_bounds[b + 1]
        t0, t1 = lay.teacher_bounds[b], lay.teacher_bounds[b + 1]
        s, t = batch.student_starts[0, s0:s1], batch.teacher_starts[0, t0:t1]
        j, k = torch.nonzero((s.unsqueeze(1) == t.unsqueeze(0)) & (s.unsqueeze(1) >= 0), as_tuple=True)
        s_pairs.append(j + s0)
        t_pairs.append(k + t0)
    return torch.cat(s_pairs), torch.cat(t_pairs)


def same_token_teacher_rows(logprobs: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
    """The teacher rows that predict the same token as each student position (token_kd).

    Same tokenizer: a window's teacher row j predicts what its student position j does. Padded:
    rows `0..J_max-1` of each batch row; packed: row `teacher_bounds[b] + j` for position j of
    window b.
    """
    if batch.packing is None:
        return logprobs[:, : batch.student_labels.shape[1]]
    lay = batch.packing
    window = lay.student_window[0]
    t_base = torch.tensor(lay.teacher_bounds[:-1], device=window.device)[window]
    s_base = torch.tensor(lay.student_bounds[:-1], device=window.device)[window]
    return logprobs[:, t_base + torch.arange(window.numel(), device=window.device) - s_base]


def distill_step(teacher_forward: TeacherForward | None, student, batch: DistillBatch, cfg: DistillConfig, *,
                 teacher_vocab: TokenBytes | None = None, teacher_eos_id: int | None = None, teacher_model=None,
                 agree_forwards: Callable[[int], int] | None = None,
                 teacher_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
                 student_vocab: TokenBytes | None = None, teacher_hidden: torch.Tensor | None = None,
                 byte_targets_cache: dict | None = None, fused_token_ce: bool = False):
    """Loss of one batch and the logs of each term (detached).

    `cfg` is the recipe's `distill` section (method, weights, divergence, conversion).
    `teacher_vocab` and `teacher_eos_id` (the teacher tokenizer's `TokenBytes` and EOS id) give
    method `bld` its byte targets; `teacher_model` (the module or engine behind
    `teacher_forward`) is needed by conversion "exact", which runs tree-masked forwards;
    `agree_forwards` keeps their count equal over ranks (see
    `bld_scale.convert.exact.exact_byte_targets`). `teacher_targets`: method `bld`'s byte targets
    `(byte_logprobs, mask)` already made, in the layout `teacher_byte_targets` gives (e.g. read from
    a teacher cache, `bld_scale.cache`, whose truncated rows decode to proper distributions: the
    stored values in place, the remaining mass spread over the other outcomes by the cache's tail
    profile, `bld_scale.cache.rows`); the teacher is then neither called nor needed.
    `student_vocab` (the student tokenizer's `TokenBytes`) gives `mined` its token strings. `dskd`
    reads the teacher's last hidden states (`teacher_hidden`, else one forward of `teacher_model`
    that returns them) and its embeddings and head from `teacher_model`. `byte_targets_cache`: a
    dict shared by calls on the SAME batch and teacher (a tool comparing students in lockstep), so
    `bld` converts once per conversion rule. Returns `(loss, logs)`; logs hold `loss`, `loss_ce`,
    and per method `loss_byte_ce`, `loss_kl`, `loss_uld`, `loss_kd`, `loss_mined`, `loss_alm` or
    `loss_kd_student`, `loss_kd_teacher`, `loss_ce_t2s`, `t2s_accuracy`, plus `tokens` and `bytes`
    counted in the batch (tensors: see below). `fused_token_ce` (`student.liger_fused_ce`, methods
    `ce` and `bld`): the student is handed the labels and returns the token CE with its head fused
    in (`bld_scale.model.fused_loss`) in place of the token logits, which are never made.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"unknown distill.method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    method = cfg.method
    if method in ALIGNING_METHODS and batch.packing is not None:
        raise ValueError(f"distill.method {method!r} aligns padded windows; set data.pack: false")
    if fused_token_ce and method not in FUSED_CE_METHODS:
        raise ValueError(f"student.liger_fused_ce serves methods {' and '.join(FUSED_CE_METHODS)}, whose only use of the "
                         f"token logits is the CE; distill.method {method!r} reads the logits: set it to false")
    hidden_wanted = {"return_hidden": True} if method == "dskd" else {}
    if fused_token_ce:
        hidden_wanted["token_labels"] = batch.student_labels
    token_out, byte_logits, *hidden = student(**batch.student_inputs(), prev_bytes=batch.byte_targets,
                                              **hidden_wanted)
    # the head fused into the CE: the student returned the CE, and there are no logits
    token_logits, fused_ce = (None, token_out) if fused_token_ce else (token_out, None)
    # tensors, not floats: reading them here would stop the host for the device every micro-batch;
    # the pipeline's LogWindow sums them where they are and reads them once per logged step
    counts = {"tokens": (batch.student_labels != -100).sum(), "bytes": batch.n_text_bytes.sum()}
    if method == "ce":
        loss = fused_ce if fused_token_ce else token_ce(token_logits, batch.student_labels)
        return loss, {"loss": loss.detach(), "loss_ce": loss.detach(), **counts}
    if teacher_targets is not None and method != "bld":
        raise ValueError(f"teacher_targets are byte targets, which only method 'bld' reads (not {method!r})")
    if teacher_forward is None and teacher_targets is None:
        raise ValueError(f"distill.method={method!r} needs a teacher")
    if method == "bld":
        if teacher_targets is not None:
            q, q_mask = teacher_targets
        elif teacher_vocab is None:
            raise ValueError("method 'bld' needs the teacher's TokenBytes for the conversion")
        elif byte_targets_cache is not None and cfg.conversion in byte_targets_cache:
            q, q_mask = byte_targets_cache[cfg.conversion]
        else:
            q, q_mask, _ = teacher_byte_targets(batch, teacher_vocab, conversion=cfg.conversion,
                                                teacher_forward=teacher_forward, teacher_model=teacher_model,
                                                eos_id=teacher_eos_id, exact_chunk_tokens=cfg.exact_chunk_tokens,
                                                agree_forwards=agree_forwards, backend=cfg.conversion_backend)
            if byte_targets_cache is not None:
                byte_targets_cache[cfg.conversion] = (q, q_mask)
        rows, row_mask = gather_teacher_rows(q, batch.teacher_rows, q_mask)
        loss, logs = bld_loss(token_logits, batch.student_labels, byte_logits, batch.byte_targets,
                              rows, row_mask, lambda_b=cfg.lambda_b, lambda_kl=cfg.lambda_kl,
                              divergence=cfg.divergence, beta=cfg.beta,
                              temperature=cfg.temperature, token_ce_value=fused_ce)
        return loss, {**{k: v.detach() for k, v in logs.items()}, "loss": loss.detach(), **counts}
    if method == "dskd" and teacher_hidden is None:
        teacher_hidden, logprobs = teacher_hidden_and_logprobs(teacher_model, batch)
    else:
        logprobs = teacher_token_logprobs(teacher_forward, batch)
    ce = token_ce(token_logits, batch.student_labels)
    if method in ("mined", "alm"):
        term = (mined_term(batch, token_logits, logprobs, teacher_vocab, student_vocab, cfg) if method == "mined"
                else alm_term(batch, token_logits, logprobs, cfg))
        loss = ce + cfg.lambda_kl * term
        return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), f"loss_{method}": term.detach(), **counts}
    if method == "dskd":
        t = dskd_term(batch, student, token_logits, hidden[0], teacher_model, teacher_hidden, logprobs, cfg)
        # CE_t2s trains the projectors alone (student inputs detached): weight 1, no trade-off
        loss = ce + t["ce_t2s"] + cfg.lambda_kl * (t["kd_student"] + t["kd_teacher"])
        return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), **counts,
                      **{f"loss_{k}" if k != "t2s_accuracy" else k: v.detach() for k, v in t.items()}}
    if method == "token_kd":
        mask = batch.student_labels != -100
        kd = token_kd_loss(token_logits, same_token_teacher_rows(logprobs, batch), mask,
                           temperature=cfg.temperature)
        loss = ce + cfg.lambda_kl * kd
        return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_kd": kd.detach(), **counts}
    s_idx, t_idx = uld_pairs(batch)
    s_rows = token_logits.reshape(-1, token_logits.shape[-1])[s_idx]
    t_rows = logprobs.reshape(-1, logprobs.shape[-1])[t_idx]
    uld = uld_loss(s_rows, t_rows, temperature=cfg.temperature)
    loss = ce + cfg.lambda_kl * uld
    return loss, {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_uld": uld.detach(), **counts}

