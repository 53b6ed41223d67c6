"""`distill_step` for method bld when each window is split over a sequence-parallel group.

Every rank of the group holds the whole (padded) batch: token ids, offsets and spans are small.
The models see a slice of the positions: teacher rows `[k0, k1)` and student positions `[j0, j1)`
of every window, the padded lengths rounded up to a multiple of the group size and cut evenly
(`convert.shard_plan.even_bounds`), with position ids and no attention masks (right padding is
invisible to causal attention). The attention itself is DeepSpeed's Ulysses
(`bld_scale.parallel.sequence`), set up by the pipeline; the teacher's local log-probabilities are
converted on their rank (`convert.sequence_parallel`) and the rows the student slots read arrive
by byte offset; the loss is reduced over the group (`train.sequence_loss`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bld_scale.config import DistillConfig
from bld_scale.convert.sequence_parallel import SequenceGroup, sequence_parallel_rows
from bld_scale.convert.shard_plan import even_bounds
from bld_scale.data.batch import IGNORE, DistillBatch
from bld_scale.train.sequence_loss import GroupSum, sequence_parallel_bld_loss
from bld_scale.tokenize.token_bytes import TokenBytes


def _pad_to(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad dim 1 of `t` to `length`."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return F.pad(t, pad, value=value)


def _positions(batch_size: int, length: int, device) -> torch.Tensor:
    return torch.arange(length, device=device).unsqueeze(0).expand(batch_size, -1)


def slot_rows(rows: list[torch.Tensor], wanted: list[np.ndarray], slots: torch.Tensor):
    """`(q [B, J_r, K, 257], mask [B, J_r, K])` for this rank's slots from the rows it received
    (`rows[b][i]` is byte row `wanted[b][i]`); slot row -1 and rows without mass are masked."""
    B, J, K = slots.shape
    q = torch.full((B, J, K, 257), float("-inf"), device=slots.device)
    valid = slots >= 0
    for b in range(B):
        if len(wanted[b]) == 0:
            continue
        where = torch.as_tensor(np.searchsorted(wanted[b], slots[b].clamp(min=0).cpu().numpy()),
                                device=slots.device).clamp(max=len(wanted[b]) - 1)
        q[b] = torch.where(valid[b].unsqueeze(-1), rows[b].to(q.device)[where], q[b])
    return q, valid & torch.isfinite(q).any(-1)


def sequence_parallel_step(teacher_forward: Callable, student, batch: DistillBatch, cfg: DistillConfig,
                           sp: SequenceGroup, group_sum: GroupSum, *, teacher_vocab: TokenBytes,
                           teacher_eos_id: int | None = None, teacher_model=None,
                           agree_forwards: Callable[[int], int] | None = None, plain_attention=contextlib.nullcontext):
    """This rank's `(loss for backward, logs)` of one padded batch under sequence parallelism.

    teacher_forward: `(input_ids, None, position_ids) -> logits` of this rank's teacher positions
    (Ulysses inside); student: `(input_ids, attention_mask, prev_bytes, position_ids) -> (token
    logits, byte logits)` likewise. group_sum: a float64 all-reduce over the group. plain_attention:
    a context without Ulysses, for the exact conversion's tree forwards (each rank its own).
    logs: the group's `loss`, `loss_ce`, `loss_byte_ce`, `loss_kl` (the unsplit batch's), and
    `tokens`, `bytes` counted once per group.
    """
    if cfg.method != "bld":
        raise ValueError(f"sequence parallelism runs distill.method bld, not {cfg.method!r}")
    if batch.packing is not None:
        raise ValueError("sequence parallelism runs padded batches: set data.pack: false")
    N, device = sp.size, batch.teacher_input_ids.device
    B = batch.teacher_input_ids.shape[0]
    t_len = -(-batch.teacher_input_ids.shape[1] // N) * N
    t_bounds = even_bounds(t_len, N)
    k0, k1 = t_bounds[sp.rank], t_bounds[sp.rank + 1]
    t_ids = _pad_to(batch.teacher_input_ids, t_len, int(batch.teacher_input_ids[0, 0]))
    with torch.no_grad():
        logits = teacher_forward(t_ids[:, k0:k1], None, _positions(B, t_len, device)[:, k0:k1])
        local_lp = torch.log_softmax(getattr(logits, "logits", logits).float(), dim=-1)
    del logits

    s_len = -(-batch.student_input_ids.shape[1] // N) * N
    s_bounds = even_bounds(s_len, N)
    j0, j1 = s_bounds[sp.rank], s_bounds[sp.rank + 1]
    s_ids = _pad_to(batch.student_input_ids, s_len, int(batch.student_input_ids[0, 0]))
    labels = _pad_to(batch.student_labels, s_len, IGNORE)[:, j0:j1]
    byte_targets = _pad_to(batch.byte_targets, s_len, IGNORE)[:, j0:j1]
    token_logits, byte_logits = student(input_ids=s_ids[:, j0:j1], attention_mask=None, prev_bytes=byte_targets,
                                        position_ids=_positions(B, s_len, device)[:, j0:j1])

    slots = _pad_to(batch.teacher_rows, s_len, -1)
    slots_np = slots.cpu().numpy()
    wanted = [[np.unique(slots_np[b, s_bounds[r]:s_bounds[r + 1]][slots_np[b, s_bounds[r]:s_bounds[r + 1]] >= 0])
               for r in range(N)] for b in range(B)]
    with plain_attention():  # exact's tree forwards are each rank's own
        rows = sequence_parallel_rows(local_lp, batch.teacher_ids, teacher_vocab, t_bounds, wanted, sp,
                                      eos_id=teacher_eos_id, mode=cfg.conversion, backend=cfg.conversion_backend,
                                      teacher_model=teacher_model,
                                      bos_ids=[int(x) for x in batch.teacher_input_ids[:, 0]],
                                      max_tokens=cfg.exact_chunk_tokens, agree_forwards=agree_forwards)
    del local_lp
    q, q_mask = slot_rows(rows, [w[sp.rank] for w in wanted], slots[:, j0:j1])
    loss, logs = sequence_parallel_bld_loss(token_logits, labels, byte_logits, byte_targets, q, q_mask, group_sum,
                                            N, lambda_b=cfg.lambda_b, lambda_kl=cfg.lambda_kl,
                                            divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature)
    counts = {"tokens": float((labels != IGNORE).sum()),
              "bytes": float(batch.n_text_bytes.sum()) if sp.rank == 0 else 0.0}
    return loss, {**logs, **counts}
