"""BLD's loss when a window's student positions are split over a sequence-parallel group.

Each term of `losses.bld_loss` is a mean over the window's counted tokens, byte slots or teacher
rows. Under sequence parallelism a rank holds only some of them, so a per-rank mean would weight
the ranks' slices equally, not their counts. Here each rank sums its own terms and divides by the
group's counts (one all-reduce of three numbers): the ranks' values add up to the unsplit loss,
and so do their gradients. `sequence_parallel_bld_loss` returns both:
- `for_backward` = group size x this rank's share: the engine then averages gradients over every
  rank (data- and sequence-parallel alike), which gives sum over the group / data-parallel size,
  the gradient of the unsplit loss averaged over data-parallel replicas;
- `logs`: the group's total of each term (the unsplit loss of the window), the same on every rank
  of the group, so averaging logs over all ranks gives what the unsplit run logs.
"""
from __future__ import annotations

from typing import Callable

import torch

from bld_scale.train.losses import byte_ce, byte_divergence, token_ce

# Sums `values` (float64) over the sequence-parallel group: `[a, b, ...] -> [sum a, sum b, ...]`.
GroupSum = Callable[[torch.Tensor], torch.Tensor]


def sequence_parallel_bld_loss(token_logits: torch.Tensor, token_labels: torch.Tensor, byte_logits: torch.Tensor,
                               byte_targets: torch.Tensor, teacher_logq: torch.Tensor, teacher_mask: torch.Tensor,
                               group_sum: GroupSum, group_size: int, *, lambda_ce: float = 1.0,
                               lambda_b: float = 1.0, lambda_kl: float = 0.1, divergence: str = "forward_kl",
                               beta: float = 0.5, temperature: float = 1.0):
    """`(for_backward, logs)` of this rank's slice of the student positions (see the module docstring).

    Inputs are `losses.bld_loss`'s, restricted to this rank's positions: `teacher_logq [B, J_r, K, 257]`
    and `teacher_mask` as `gather_teacher_rows` gives them (here from the sequence-parallel
    conversion). A term whose lambda is 0 is not computed. logs: `loss`, `loss_ce`, `loss_byte_ce`,
    `loss_kl` (detached, the group's values).
    """
    terms = {"loss_ce": (lambda_ce, lambda: token_ce(token_logits, token_labels, reduction="sum")),
             "loss_byte_ce": (lambda_b, lambda: byte_ce(byte_logits, byte_targets, reduction="sum")),
             "loss_kl": (lambda_kl, lambda: byte_divergence(teacher_logq, byte_logits, teacher_mask, divergence,
                                                            beta=beta, temperature=temperature, reduction="sum"))}
    if all(weight == 0 for weight, _ in terms.values()):
        raise ValueError("sequence_parallel_bld_loss: every lambda is 0, nothing to train")
    defined = torch.isfinite(teacher_logq).any(-1) & teacher_mask.bool()
    local_counts = torch.stack([(token_labels != -100).sum(), (byte_targets != -100).sum(), defined.sum()])
    counts = group_sum(local_counts.double()).clamp(min=1).to(token_logits.device)
    share, parts = None, {}
    for (name, (weight, compute)), count in zip(terms.items(), counts):
        if weight == 0:
            continue
        value = compute() / count  # this rank's part of the group's mean
        parts[name] = value.detach()
        share = weight * value if share is None else share + weight * value
    names = list(parts)
    totals = group_sum(torch.stack([share.detach().double()] + [parts[n].double() for n in names]))
    logs = {"loss": totals[0].float(), **{n: totals[i + 1].float() for i, n in enumerate(names)}}
    return share * group_size, logs
