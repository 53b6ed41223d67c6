"""Each baseline's teacher term for `train.step.distill_step`: the batch and models in, a loss out.

The glue between a padded `DistillBatch`, the student (a `Student`, a DeepSpeed engine around
one, or a wrapper exposing `.lm` and `.projectors`) and the teacher (HF model or engine), and the
method modules, which see only tensors.
"""
from __future__ import annotations

import torch

from bld_scale.data.batch import DistillBatch
from bld_scale.train.baselines.alm import alm_loss
from bld_scale.train.baselines.dskd import dskd_terms, teacher_targets
from bld_scale.train.baselines.mined import mined_loss, mined_pairs, student_vocab_map


def unwrapped(module):
    """The model inside a DeepSpeed engine (`.module`), or the model itself."""
    return getattr(module, "module", module)


def mined_term(batch: DistillBatch, token_logits, teacher_logprobs, teacher_vocab, student_vocab, cfg):
    if student_vocab is None or teacher_vocab is None:
        raise ValueError("method 'mined' needs both tokenizers' TokenBytes (teacher_vocab, student_vocab)")
    s_idx, t_idx = mined_pairs(batch, student_vocab.table, teacher_vocab.table)
    vocab_map = student_vocab_map(teacher_vocab.table, student_vocab.table)
    if vocab_map.numel() < teacher_logprobs.shape[-1]:  # model rows past the tokenizer: no bytes
        vocab_map = torch.cat([vocab_map, vocab_map.new_full((teacher_logprobs.shape[-1] - vocab_map.numel(),), -1)])
    s_rows = token_logits.reshape(-1, token_logits.shape[-1])[s_idx.to(token_logits.device)]
    t_rows = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])[t_idx.to(teacher_logprobs.device)]
    return mined_loss(s_rows, t_rows, vocab_map[: teacher_logprobs.shape[-1]], top_k=cfg.top_k,
                      temperature=cfg.temperature)


def alm_term(batch: DistillBatch, token_logits, teacher_logprobs, cfg):
    return alm_loss(batch, token_logits, teacher_logprobs, temperature=cfg.temperature)


def teacher_hidden_and_logprobs(teacher_model, batch: DistillBatch):
    """The teacher's last hidden states and log-probabilities (one forward, no gradient)."""
    with torch.no_grad():
        out = teacher_model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                            output_hidden_states=True)
    return out.hidden_states[-1], torch.log_softmax(out.logits.float(), -1)


def dskd_term(batch: DistillBatch, student, token_logits, student_hidden, teacher_model, teacher_hidden,
              teacher_logprobs, cfg) -> dict[str, torch.Tensor]:
    if batch.packing is not None:
        raise ValueError("distill.method 'dskd' takes padded batches; set data.pack: false")
    core = unwrapped(student)
    projectors = getattr(core, "projectors", None)
    if projectors is None:
        raise ValueError("method 'dskd' needs the student's projectors: build it with teacher_hidden_size "
                         "(train.setup.setup_student with teacher_config)")
    if teacher_model is None:
        raise ValueError("method 'dskd' needs the teacher model (its embeddings and LM head)")
    teacher = unwrapped(teacher_model)
    s_embed = core.lm.get_input_embeddings()
    labels = batch.student_labels
    t_targets, t_mask = teacher_targets(batch.teacher_input_ids, batch.teacher_attention_mask,
                                        pad_id=int(batch.teacher_input_ids[0, 0]))
    t_embed = teacher.get_input_embeddings()
    with torch.no_grad():
        t_in, t_out = t_embed(batch.teacher_input_ids), t_embed(t_targets)
    return dskd_terms(
        projectors, student_hidden=student_hidden, student_logits=token_logits,
        student_input_embeds=s_embed(batch.student_input_ids), student_target_embeds=s_embed(labels.clamp(min=0)),
        student_head=core.lm.get_output_embeddings(), student_labels=labels,
        teacher_hidden=teacher_hidden, teacher_logprobs=teacher_logprobs, teacher_input_embeds=t_in,
        teacher_target_embeds=t_out, teacher_mask=t_mask, teacher_head=teacher.get_output_embeddings(),
        temperature=cfg.temperature)
