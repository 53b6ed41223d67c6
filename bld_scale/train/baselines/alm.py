"""ALM (Minixhofer et al. 2025, "Cross-Tokenizer Distillation via Approximate Likelihood Matching").

A window's text is cut into chunks at the byte offsets where a token of the student AND a token
of the teacher end (both tokenizations have a boundary there). Inside a chunk each model's
log-likelihood is the sum of its tokens' log-probabilities, so both score the same bytes.
The loss compares them with the binarised f-divergence: teacher and student each give the
chunk a probability, p = exp(log p_T(c) / tau) and q = exp(log p_S(c) / tau), read as two
Bernoulli distributions (the chunk, or anything else), and the divergence between those two is
taken; here f = KL: p log(p/q) + (1-p) log((1-p)/(1-q)). Mean over the chunks.

Choices the paper leaves open or we simplify (ours):
- f is KL (the paper compares several f; binarised KL is its main one); tau is
  `distill.temperature` (default 1).
- No outcome-chunk debiasing and no hidden-state term: chunk boundaries are exact byte offsets
  of both tokenizations, a chunk's likelihood includes its last token in full.
- The teacher's dummy-prefix byte (SentencePiece teachers) belongs to the first chunk.
- The harness adds it to the student's token CE with weight `lambda_kl` (the paper can also
  train on ALM alone).
"""
from __future__ import annotations

import torch

from bld_scale.data.batch import DistillBatch

LOG_ONE_MINUS_FLOOR = -1e-6  # log p below this: 1 - p stays representable in float32


def _token_ends(starts: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """End offsets of consecutive tokens given their start offsets (the last ends at n_bytes)."""
    return torch.cat([starts[1:], torch.tensor([n_bytes], dtype=starts.dtype, device=starts.device)])


def chunk_ids(student_ends: torch.Tensor, teacher_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chunk index of every student and teacher token, and the number of chunks.

    Chunk c holds the tokens ending after boundary c-1 and at or before boundary c, the
    boundaries being the offsets where tokens of both sides end.
    """
    common = student_ends[torch.isin(student_ends, teacher_ends)].unique(sorted=True)
    return (torch.searchsorted(common, student_ends), torch.searchsorted(common, teacher_ends),
            int(common.numel()))


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) from log p and log q, elementwise."""
    log_p, log_q = log_p.clamp(max=LOG_ONE_MINUS_FLOOR), log_q.clamp(max=LOG_ONE_MINUS_FLOOR)
    log_1p, log_1q = torch.log(-torch.expm1(log_p)), torch.log(-torch.expm1(log_q))
    return log_p.exp() * (log_p - log_q) + (-torch.expm1(log_p)) * (log_1p - log_1q)


def chunk_logprobs(batch: DistillBatch, student_token_logprobs: torch.Tensor,
                   teacher_token_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk log-likelihoods `(student, teacher)`, flat over the batch's windows.

    `student_token_logprobs [B, J]`: log p of each label (padding ignored);
    `teacher_token_logprobs [B, L+1]`: row k's log p of teacher token k (rows past the tokens ignored).
    """
    if batch.packing is not None:
        raise ValueError("distill.method 'alm' takes padded batches; set data.pack: false")
    s_out, t_out = [], []
    for b in range(batch.student_labels.shape[0]):
        J = int((batch.student_labels[b] != -100).sum())
        L = len(batch.teacher_ids[b])
        if J == 0 or L == 0:
            continue
        n = int(batch.n_text_bytes[b])
        s_ends = _token_ends(batch.student_starts[b, :J], n)
        t_ends = _token_ends(batch.teacher_starts[b, :L].clamp(min=0), n)
        s_chunk, t_chunk, n_chunks = chunk_ids(s_ends, t_ends)
        s_sum = torch.zeros(n_chunks, dtype=torch.float32, device=student_token_logprobs.device)
        t_sum = torch.zeros(n_chunks, dtype=torch.float32, device=teacher_token_logprobs.device)
        s_out.append(s_sum.index_add(0, s_chunk.to(s_sum.device), student_token_logprobs[b, :J].float()))
        t_out.append(t_sum.index_add(0, t_chunk.to(t_sum.device), teacher_token_logprobs[b, :L].float()))
    if not s_out:
        empty = student_token_logprobs.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(s_out), torch.cat(t_out)


def alm_loss(batch: DistillBatch, student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean binarised KL over the batch's chunks (0, attached, when there are none)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = batch.student_labels
    s_lp = torch.log_softmax(student_logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    t_ids = batch.teacher_input_ids[:, 1:]  # row k predicts input k + 1: teacher token k
    t_lp = teacher_logprobs[:, :-1].float().gather(-1, t_ids.unsqueeze(-1)).squeeze(-1)
    s_chunks, t_chunks = chunk_logprobs(batch, s_lp, t_lp)
    if s_chunks.numel() == 0:
        return student_logits.sum() * 0.0
    return binary_kl(t_chunks / temperature, s_chunks / temperature).mean()
