"""MinED (Wan et al. 2024, "Knowledge Fusion of Large Language Models", FuseLLM section 3.3).

Two alignments, both by minimum edit distance:
1. Tokens. The student's and the teacher's token sequences of a window are aligned by dynamic
   programming that minimises the total edit cost (the alignment FuseLLM takes from Fu et al.
   2023: dynamic time warping whose cell cost is the edit distance between the two tokens'
   strings). A student position gets the teacher row of its aligned token.
2. Vocabularies. Each of the teacher's top-k tokens at that row is mapped to the student token
   whose string is nearest in edit distance (`edit_distance.nearest_token_map`, once per pair).

The loss at every aligned student position is KL(q_mapped || p_student), q_mapped the teacher's
top-k probabilities moved onto their mapped student ids (FuseLLM's fusion term is the cross
entropy to that distribution: the same gradient).

Choices the paper leaves open (ours):
- Token strings are the tokens' exact bytes (`TokenBytes`), not the tokenizers' display strings
  with "Ġ"/"▁" markers: the same text, without marker conversion.
- DTW steps are diagonal, down and right, each paying the cell's edit distance; the path
  ends in the last cell of both sequences. Backtracking prefers the diagonal, then the student
  step, then the teacher step on equal totals. A student token matched to several teacher tokens
  takes the one of smallest edit distance (first on ties), so every student position has one
  teacher row.
- k = `distill.top_k` (FuseLLM keeps 10). Probabilities are the teacher's full-vocabulary softmax
  at its top-k tokens; mass of tokens mapped to one student id is summed (FuseLLM does not say)
  and the result renormalised; a teacher token without bytes (special) is dropped.
- Every student position counts (no threshold on the alignment cost).
"""
from __future__ import annotations

import numpy as np
import torch

from bld_scale.data.batch import DistillBatch
from bld_scale.train.baselines.edit_distance import edit_distance_matrix, nearest_token_map
from bld_scale.train.losses import byte_divergence

_DIAGONAL, _STUDENT_STEP, _TEACHER_STEP = 0, 1, 2


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The minimal-total-cost monotone path through `cost [J, L]` from (0, 0) to (J-1, L-1).

    Filled by anti-diagonals (each cell needs only the two previous ones), so a window of a few
    hundred tokens costs a few hundred numpy calls.
    """
    J, L = cost.shape
    total = np.full((J + 1, L + 1), np.inf)
    total[0, 0] = 0.0
    moves = np.zeros((J, L), dtype=np.int8)
    for d in range(J + L - 1):
        j = np.arange(max(0, d - L + 1), min(J, d + 1))
        k = d - j
        options = np.stack([total[j, k], total[j, k + 1], total[j + 1, k]])  # diag, student, teacher
        move = np.argmin(options, axis=0)  # first minimum: the preference order above
        moves[j, k] = move
        total[j + 1, k + 1] = cost[j, k] + options[move, np.arange(len(j))]
    path, j, k = [], J - 1, L - 1
    while True:
        path.append((j, k))
        if j == 0 and k == 0:
            break
        move = moves[j, k]
        if move == _DIAGONAL:
            j, k = j - 1, k - 1
        elif move == _STUDENT_STEP:
            j -= 1
        else:
            k -= 1
    return path[::-1]


def align_tokens(student_tokens: list[bytes], teacher_tokens: list[bytes]) -> list[int]:
    """For each student token, the index of its aligned teacher token (MinED token alignment)."""
    if not student_tokens or not teacher_tokens:
        raise ValueError("token alignment needs at least one token on each side")
    cost = edit_distance_matrix(student_tokens, teacher_tokens).numpy().astype(np.float64)
    best: dict[int, int] = {}
    for j, k in dtw_path(cost):
        if j not in best or cost[j, k] < cost[j, best[j]]:
            best[j] = k
    return [best[j] for j in range(len(student_tokens))]


def mined_pairs(batch: DistillBatch, student_table, teacher_table) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (student position, teacher row) pairs of a padded batch, one per student position."""
    if batch.packing is not None:
        raise ValueError("distill.method 'mined' takes padded batches; set data.pack: false")
    B, J = batch.student_labels.shape
    L1 = batch.teacher_input_ids.shape[1]
    s_idx, t_idx = [], []
    for b in range(B):
        labels = [int(x) for x in batch.student_labels[b] if int(x) != -100]
        t_ids = batch.teacher_ids[b]
        if not labels or not t_ids:
            continue
        aligned = align_tokens([student_table[u] or b"" for u in labels], [teacher_table[t] or b"" for t in t_ids])
        s_idx += [b * J + j for j in range(len(labels))]
        t_idx += [b * L1 + k for k in aligned]  # teacher row k predicts teacher token k
    return torch.tensor(s_idx, dtype=torch.long), torch.tensor(t_idx, dtype=torch.long)


def mapped_teacher_logprobs(teacher_logprobs: torch.Tensor, vocab_map: torch.Tensor, student_vocab: int,
                            top_k: int) -> torch.Tensor:
    """[P, Vs] log-probabilities: each row's top-k teacher tokens moved to their mapped student ids.

    `teacher_logprobs [P, Vt]` (log-softmax rows), `vocab_map [Vt]` (-1: no student token).
    Mass landing on one id is summed; rows are renormalised over the kept mass; ids that get no
    mass are -inf.
    """
    top_logq, top_ids = teacher_logprobs.float().topk(min(top_k, teacher_logprobs.shape[-1]), dim=-1)
    target = vocab_map.to(top_ids.device)[top_ids]
    mass = torch.where(target >= 0, top_logq.exp(), torch.zeros_like(top_logq))
    probs = torch.zeros((teacher_logprobs.shape[0], student_vocab), dtype=torch.float32, device=mass.device)
    probs.scatter_add_(1, target.clamp(min=0), mass)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    return probs.log()  # log 0 = -inf: zero mass, handled by byte_divergence


def mined_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, vocab_map: torch.Tensor,
               top_k: int = 10, temperature: float = 1.0) -> torch.Tensor:
    """Mean over aligned pairs of KL(q_mapped || p) * T^2; `[P, Vs]` student logits, `[P, Vt]` teacher log-probs."""
    target = mapped_teacher_logprobs(teacher_logprobs, vocab_map, student_logits.shape[-1], top_k)
    return byte_divergence(target, student_logits, None, "forward_kl", temperature=temperature)


def student_vocab_map(teacher_table, student_table) -> torch.Tensor:
    """MinED's teacher -> student map for these two vocabularies (cached per pair)."""
    return nearest_token_map(teacher_table, student_table)
