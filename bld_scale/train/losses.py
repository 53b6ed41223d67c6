"""Loss terms for distillation, one pure tensor function per term. All values are in nats.

- ``token_ce``: next-token cross-entropy of the student on the true text.
- ``byte_ce``: cross-entropy of the byte head on the true bytes of each next token (BLD).
- ``byte_divergence``: D(teacher bytes q || student byte head p), BLD's distillation term
  (Singh et al. 2026, "Cross-Tokenizer LLM Distillation through a Byte-Level Interface"; forward
  KL there), with reverse KL, generalised JSD(beta) (as in GKD, Agarwal et al. 2024, "On-Policy
  Distillation of Language Models") and total variation as options, plus a temperature.
- ``bld_loss``: BLD's objective ``lambda_ce*CE(token) + lambda_b*CE(bytes) + lambda_kl*D(q || p)``.
- ``gather_teacher_rows``: teacher byte rows looked up by absolute byte row (the shared coordinate).
- ``uld_loss``: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs"), a cross-tokenizer baseline.
- ``token_kd_loss``: token-level KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"), same-tokenizer baseline.

Conventions: integer targets use -100 for masked; masks are boolean, True = counts. A teacher row
that is all -inf (zero mass everywhere) is undefined and masked automatically. ``reduction``:
"mean" (over counted rows; 0 when none count, still attached to the graph), "sum", or "none"
(per-row values, 0 at masked rows). Computation is in float32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# log q floor for reverse KL: the student gives every byte mass, so KL(p || q) is infinite where
# q = 0; clamping log q at -30 (q ~ 1e-13) keeps it finite while still pushing p there to zero.
REVERSE_KL_LOG_FLOOR = -30.0


def _reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    # torch.where, not multiplication: a NaN/inf at a masked row must not leak into the sum.
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of unmasked (!= -100) targets: the denominator of a "mean" reduction."""
    return (labels != IGNORE_INDEX).sum()


def token_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` against ``labels [...]`` (-100 ignored)."""
    mask = labels != IGNORE_INDEX
    vocab = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1).long(),
                          ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return _reduce(nll, mask, reduction)


def byte_ce(byte_logits: torch.Tensor, byte_targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BLD's byte cross-entropy: ``byte_logits [B,J,K,257]`` vs true bytes ``[B,J,K]`` (-100 masked)."""
    return token_ce(byte_logits, byte_targets, reduction)


def _divergence_rows(teacher_logq: torch.Tensor, student_logits: torch.Tensor, kind: str,
                     beta: float, temperature: float) -> torch.Tensor:
    """Per-row D(q || p) for finite-somewhere teacher rows (callers replace undefined rows)."""
    logq = torch.log_softmax(teacher_logq.float() / temperature, dim=-1)
    logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    q, p = logq.exp(), logp.exp()
    # 0 * log 0 = 0: zero-probability teacher entries contribute nothing to q log q.
    logq_finite = torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))
    if kind == "forward_kl":
        rows = (q * (logq_finite - logp)).sum(-1)
    elif kind == "reverse_kl":
        rows = (p * (logp - logq.clamp(min=REVERSE_KL_LOG_FLOOR))).sum(-1)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD beta must lie in (0, 1), got {beta}")
        log_m = torch.logsumexp(torch.stack([logq + math.log(beta), logp + math.log(1.0 - beta)]), dim=0)
        kl_q_m = (q * (logq_finite - log_m)).sum(-1)
        kl_p_m = (p * (logp - log_m)).sum(-1)
        rows = beta * kl_q_m + (1.0 - beta) * kl_p_m
    elif kind == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose from {DIVERGENCES}")
    # Hinton et al.: KL gradients shrink as 1/T^2, so scale by T^2 to keep the term's weight
    # comparable across temperatures. Applied to the KL family (forward, reverse, JSD), not TVD.
    return rows * temperature ** 2


def byte_divergence(teacher_logq: torch.Tensor, student_logits: torch.Tensor,
                    mask: torch.Tensor | None = None, kind: str = "forward_kl", beta: float = 0.5,
                    temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Divergence between teacher byte distributions q and the student byte head p, per row.

    ``teacher_logq [..., 257]``: log-probabilities (-inf allowed for zero mass; all -inf = undefined
    row, masked). ``student_logits [..., 257]``: the head's raw logits. ``mask [...]``: rows that
    count (padding, slots past the token or past K are False).

    kind: "forward_kl" = KL(q || p) (BLD's default, mass-covering); "reverse_kl" = KL(p || q)
    (mode-seeking; log q clamped at ``REVERSE_KL_LOG_FLOOR`` where q = 0); "jsd" =
    beta*KL(q || m) + (1-beta)*KL(p || m), m = beta*q + (1-beta)*p (GKD's generalised JSD; beta=0.5
    is the usual JSD, at most ln 2); "tvd" = 0.5 * sum |q - p|.
    ``temperature`` T divides the student logits and the teacher log-probabilities (teacher
    re-normalised by log_softmax(logq / T)); the KL family is multiplied by T^2.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    defined = torch.isfinite(teacher_logq).any(-1)
    valid = defined if mask is None else defined & mask.bool()
    # Undefined/masked teacher rows become uniform so no NaN appears anywhere, not even in
    # branches that are later discarded (NaN would poison the gradients through torch.where).
    safe_logq = torch.where(valid.unsqueeze(-1), teacher_logq.float(), torch.zeros((), device=teacher_logq.device))
    rows = _divergence_rows(safe_logq, student_logits, kind, beta, temperature)
    return _reduce(rows, valid, reduction)


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None = None, temperature: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Token-level forward KL(teacher || student) * T^2 (Hinton et al. 2015); same tokenizer only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token KD needs one vocabulary: student {tuple(student_logits.shape)} "
                         f"vs teacher {tuple(teacher_logits.shape)}")
    teacher_logq = torch.log_softmax(teacher_logits.float(), dim=-1)
    return byte_divergence(teacher_logq, student_logits, mask, "forward_kl", temperature=temperature,
                           reduction=reduction)


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             mask: torch.Tensor | None = None, temperature: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) over aligned pairs ``[P, Vs]``/``[P, Vt]``.

    Each probability vector is sorted in descending order and the shorter one zero-padded, then
    the L1 distance is summed over the vocabulary (the closed form of their Wasserstein bound
    without any vocabulary mapping); mean over the (unmasked) pairs.
    """
    p = torch.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = torch.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    rows = (p - q).abs().sum(-1)
    valid = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.bool()
    return _reduce(rows, valid, reduction)


def gather_teacher_rows(teacher_logq: torch.Tensor, row_index: torch.Tensor,
                        row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher byte rows for every student head slot, by absolute byte row.

    ``teacher_logq [B, R, 257]`` (e.g. ``byte_logprobs_batch`` output, R = Nmax+1),
    ``row_index [B, J, K]`` long (-1 = masked), optional ``row_mask [B, R]`` (False = padding).
    Returns ``rows [B, J, K, 257]`` (all -inf where masked) and ``mask [B, J, K]``; rows that are
    all -inf count as undefined and are masked.
    """
    batch, num_rows, _ = teacher_logq.shape
    if row_index.shape[0] != batch:
        raise ValueError(f"row_index batch {row_index.shape[0]} != teacher batch {batch}")
    if row_index.numel() and int(row_index.max()) >= num_rows:
        raise IndexError(f"row index {int(row_index.max())} out of range for {num_rows} teacher rows")
    safe_index = row_index.clamp(min=0).long()
    batch_index = torch.arange(batch, device=row_index.device).view(batch, *([1] * (row_index.dim() - 1)))
    rows = teacher_logq[batch_index, safe_index]
    mask = (row_index >= 0) & torch.isfinite(rows).any(-1)
    if row_mask is not None:
        mask &= row_mask[batch_index, safe_index]
    rows = torch.where(mask.unsqueeze(-1), rows, torch.full((), float("-inf"), dtype=rows.dtype, device=rows.device))
    return rows, mask


def bld_loss(token_logits: torch.Tensor, token_labels: torch.Tensor,
             byte_logits: torch.Tensor | None = None, byte_targets: torch.Tensor | None = None,
             teacher_logq: torch.Tensor | None = None, teacher_mask: torch.Tensor | None = None,
             *, lambda_ce: float = 1.0, lambda_b: float = 1.0, lambda_kl: float = 0.1,
             divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
             log_disabled: bool = False, token_ce_value: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BLD objective (Singh et al. 2026): ``lambda_ce*CE(token) + lambda_b*CE(bytes) + lambda_kl*D``.

    ``teacher_logq [B,J,K,257]`` / ``teacher_mask [B,J,K]``: from ``gather_teacher_rows``.
    A term whose lambda is 0 is not computed at all (its inputs may be None); with
    ``log_disabled`` it is still evaluated for the logs, under no_grad, when its inputs are given.
    ``token_ce_value``: the token CE already computed (the head fused into it,
    ``bld_scale.model.fused_loss``), used as ``CE(token)``; ``token_logits`` may then be None.
    Returns the total and a dict of detached scalar tensors ``loss_ce``, ``loss_byte_ce``,
    ``loss_kl`` (the enabled ones; detached tensors, so logging forces no device sync here).
    """
    terms = {
        "loss_ce": (lambda_ce, lambda: token_ce(token_logits, token_labels) if token_ce_value is None
                    else token_ce_value),
        "loss_byte_ce": (lambda_b, lambda: byte_ce(byte_logits, byte_targets)),
        "loss_kl": (lambda_kl, lambda: byte_divergence(teacher_logq, byte_logits, teacher_mask, divergence,
                                                       beta=beta, temperature=temperature)),
    }
    if all(weight == 0 for weight, _ in terms.values()):
        raise ValueError("bld_loss: every lambda is 0, nothing to train")
    needed = {"loss_byte_ce": (byte_logits, byte_targets), "loss_kl": (byte_logits, teacher_logq)}
    missing = {name for name, inputs in needed.items() if any(t is None for t in inputs)}
    for name in missing:
        if terms[name][0] != 0:
            raise ValueError(f"bld_loss: {name} is enabled but its inputs are missing (set its lambda to 0)")
    total, logs = None, {}
    for name, (weight, compute) in terms.items():
        if weight == 0:
            if log_disabled and name not in missing:
                with torch.no_grad():
                    logs[name] = compute().detach()
            continue
        value = compute()
        logs[name] = value.detach()
        total = weight * value if total is None else total + weight * value
    return total, logs
