"""Loss terms checked against float64 formulas written here, closed forms and brute-force loops."""
import math

import pytest
import torch

from bld_scale.train.losses import (
    DIVERGENCES, REVERSE_KL_LOG_FLOOR, bld_loss, byte_ce, byte_divergence, count_targets,
    gather_teacher_rows, token_ce, token_kd_loss, uld_loss,
)

NEG_INF = float("-inf")


def _logq_with_zeros(shape, seed=0, zero_frac=0.3):
    """Random teacher log-probabilities with some exact zeros (-inf), every row keeping mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 2
    zeros = torch.rand(*shape, generator=g) < zero_frac
    zeros[..., 0] = False
    return torch.log_softmax(logits.masked_fill(zeros, NEG_INF), -1)


def _reference_rows(logq, logits, kind, beta=0.5, T=1.0):
    """Direct float64 per-row formulas, one distribution at a time."""
    out = []
    for lq, z in zip(logq.reshape(-1, logq.shape[-1]).double(), logits.reshape(-1, logits.shape[-1]).double()):
        q = torch.exp(lq / T)
        q = q / q.sum()
        p = torch.exp(z / T - (z / T).max())
        p = p / p.sum()
        if kind == "forward_kl":
            val = sum(qi * math.log(qi / pi) for qi, pi in zip(q.tolist(), p.tolist()) if qi > 0) * T * T
        elif kind == "reverse_kl":
            val = sum(pi * (math.log(pi) - max(math.log(qi) if qi > 0 else NEG_INF, REVERSE_KL_LOG_FLOOR))
                      for qi, pi in zip(q.tolist(), p.tolist())) * T * T
        elif kind == "jsd":
            m = [beta * qi + (1 - beta) * pi for qi, pi in zip(q.tolist(), p.tolist())]
            kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q.tolist(), m) if qi > 0)
            kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p.tolist(), m) if pi > 0)
            val = (beta * kl_qm + (1 - beta) * kl_pm) * T * T
        else:
            val = 0.5 * sum(abs(qi - pi) for qi, pi in zip(q.tolist(), p.tolist()))
        out.append(val)
    return torch.tensor(out, dtype=torch.float64).view(logq.shape[:-1])


def test_token_ce_matches_manual_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    logp = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
    nll = [-logp[b, j, labels[b, j]].item() for b in range(2) for j in range(5) if labels[b, j] != -100]
    assert token_ce(logits, labels).item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert token_ce(logits, labels, reduction="sum").item() == pytest.approx(sum(nll), rel=1e-5)
    assert count_targets(labels).item() == len(nll)
    per = token_ce(logits, labels, reduction="none")
    assert per.shape == (2, 5) and per[0, 1] == 0 and per[1, 4] == 0


def test_byte_ce_matches_manual_and_all_masked_is_zero_with_graph():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 3, 257, generator=g, requires_grad=True)
    targets = torch.tensor([[[5, 256, -100], [-100, -100, -100]]])
    logp = torch.log_softmax(logits.double(), -1)
    expected = -(logp[0, 0, 0, 5] + logp[0, 0, 1, 256]) / 2
    assert byte_ce(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    empty = byte_ce(logits, torch.full((1, 2, 3), -100))
    assert empty.item() == 0.0
    empty.backward()  # still attached: a step where everything is masked must not crash
    assert torch.count_nonzero(logits.grad) == 0


def test_forward_kl_closed_form_with_teacher_zeros():
    # q = (1/2, 1/2, 0, ..., 0), p uniform over 257: KL(q || p) = ln(257 / 2).
    logq = torch.full((257,), NEG_INF)
    logq[:2] = math.log(0.5)
    value = byte_divergence(logq[None], torch.zeros(1, 257), kind="forward_kl")
    assert value.item() == pytest.approx(math.log(257 / 2), rel=1e-6)


def test_tvd_and_jsd_closed_forms():
    # Disjoint supports: TVD = 1 and JSD(1/2) = ln 2 (its maximum).
    logq = torch.full((1, 257), NEG_INF)
    logq[0, 3] = 0.0
    student = torch.full((1, 257), -1e4)
    student[0, 7] = 0.0
    assert byte_divergence(logq, student, kind="tvd").item() == pytest.approx(1.0, abs=1e-6)
    assert byte_divergence(logq, student, kind="jsd").item() == pytest.approx(math.log(2), abs=1e-6)
    # Equal distributions: every divergence is 0.
    logits = torch.randn(3, 257)
    for kind in DIVERGENCES:
        assert byte_divergence(torch.log_softmax(logits, -1), logits, kind=kind).item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_float64_reference(kind, temperature):
    logq = _logq_with_zeros((2, 3, 257), seed=3)
    logits = torch.randn(2, 3, 257, generator=torch.Generator().manual_seed(4)) * 3
    reference = _reference_rows(logq, logits, kind, beta=0.3, T=temperature)
    rows = byte_divergence(logq, logits, kind=kind, beta=0.3, temperature=temperature, reduction="none")
    torch.testing.assert_close(rows.double(), reference, rtol=1e-4, atol=1e-5)
    mean = byte_divergence(logq, logits, kind=kind, beta=0.3, temperature=temperature)
    assert mean.item() == pytest.approx(reference.mean().item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_masks_and_undefined_rows_give_no_nan(kind):
    logq = _logq_with_zeros((2, 4, 257), seed=5)
    logq[0, 1] = NEG_INF  # undefined teacher row: masked automatically
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    logits = torch.randn(2, 4, 257, requires_grad=True)
    value = byte_divergence(logq, logits, mask, kind=kind)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[0, 1]) == 0 and torch.count_nonzero(logits.grad[1, 3]) == 0
    keep = mask.clone()
    keep[0, 1] = False
    reference = _reference_rows(logq[keep], logits.detach()[keep], kind)
    assert value.item() == pytest.approx(reference.mean().item(), rel=1e-4, abs=1e-6)


def test_divergence_rejects_bad_arguments():
    logq, logits = torch.log_softmax(torch.randn(2, 257), -1), torch.randn(2, 257)
    with pytest.raises(ValueError):
        byte_divergence(logq, logits, kind="hellinger")
    with pytest.raises(ValueError):
        byte_divergence(logq, logits, kind="jsd", beta=1.0)
    with pytest.raises(ValueError):
        byte_divergence(logq, logits, temperature=0.0)


def test_uld_matches_brute_force_loop():
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(4, 7, generator=g), torch.randn(4, 12, generator=g)
    total = 0.0
    for s_row, t_row in zip(student.double(), teacher.double()):
        p = sorted((torch.softmax(s_row, 0)).tolist(), reverse=True)
        q = sorted((torch.softmax(t_row, 0)).tolist(), reverse=True)
        p += [0.0] * (len(q) - len(p))
        total += sum(abs(a - b) for a, b in zip(p, q))
    assert uld_loss(student, teacher).item() == pytest.approx(total / 4, rel=1e-5)
    # Symmetric in which side is longer, and zero for permuted copies of one distribution.
    assert uld_loss(teacher, student).item() == pytest.approx(total / 4, rel=1e-5)
    assert uld_loss(student, student[:, torch.randperm(7)]).item() == pytest.approx(0, abs=1e-6)


def test_token_kd_matches_reference_and_needs_one_vocabulary():
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    reference = _reference_rows(torch.log_softmax(teacher, -1), student, "forward_kl", T=2.0)[mask].mean()
    assert token_kd_loss(student, teacher, mask, temperature=2.0).item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(ValueError):
        token_kd_loss(student, teacher[..., :8])


def test_gather_teacher_rows_matches_loop():
    teacher = _logq_with_zeros((2, 6, 257), seed=8)
    teacher[1, 4] = NEG_INF  # undefined row
    row_mask = torch.ones(2, 6, dtype=torch.bool)
    row_mask[0, 5] = False  # padding row
    index = torch.tensor([[[0, 1, -1], [5, 2, 3]], [[4, 0, -1], [1, 1, 5]]])
    rows, mask = gather_teacher_rows(teacher, index, row_mask)
    assert rows.shape == (2, 2, 3, 257) and mask.shape == (2, 2, 3)
    for b in range(2):
        for j in range(2):
            for i in range(3):
                r = index[b, j, i].item()
                expected = r >= 0 and bool(row_mask[b, r]) and bool(torch.isfinite(teacher[b, r]).any())
                assert mask[b, j, i].item() == expected
                if expected:
                    assert torch.equal(rows[b, j, i], teacher[b, r])
                else:
                    assert torch.isneginf(rows[b, j, i]).all()
    with pytest.raises(IndexError):
        gather_teacher_rows(teacher, torch.full((2, 1, 1), 6))


def _bld_inputs(seed=9):
    g = torch.Generator().manual_seed(seed)
    token_logits = torch.randn(2, 4, 13, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (2, 4), generator=g)
    labels[1, 3] = -100
    byte_logits = torch.randn(2, 4, 3, 257, generator=g, requires_grad=True)
    targets = torch.randint(0, 257, (2, 4, 3), generator=g)
    targets[0, 0, 2] = -100
    teacher = _logq_with_zeros((2, 4, 3, 257), seed=seed)
    teacher_mask = targets != -100
    return token_logits, labels, byte_logits, targets, teacher, teacher_mask


def test_bld_loss_is_weighted_sum_of_terms():
    tl, lab, bl, tgt, tq, tm = _bld_inputs()
    total, logs = bld_loss(tl, lab, bl, tgt, tq, tm, lambda_b=0.7, lambda_kl=0.2, divergence="jsd", beta=0.4)
    ce, bce = token_ce(tl, lab), byte_ce(bl, tgt)
    kl = byte_divergence(tq, bl, tm, "jsd", beta=0.4)
    assert set(logs) == {"loss_ce", "loss_byte_ce", "loss_kl"}
    assert total.item() == pytest.approx((ce + 0.7 * bce + 0.2 * kl).item(), rel=1e-6)
    assert logs["loss_kl"].item() == pytest.approx(kl.item(), rel=1e-6) and not logs["loss_kl"].requires_grad


def test_bld_loss_term_with_zero_lambda_has_no_effect():
    tl, lab, bl, tgt, tq, tm = _bld_inputs()
    # A poisoned teacher would make NaN gradients if the KL term were in the graph at all.
    poisoned = torch.full_like(tq, float("nan")).requires_grad_()
    total, logs = bld_loss(tl, lab, bl, tgt, poisoned, tm, lambda_kl=0.0)
    total.backward()
    assert "loss_kl" not in logs and poisoned.grad is None
    grads = (tl.grad.clone(), bl.grad.clone())
    tl.grad = bl.grad = None
    (token_ce(tl, lab) + byte_ce(bl, tgt)).backward()
    assert torch.equal(grads[0], tl.grad) and torch.equal(grads[1], bl.grad)
    # Teacher inputs may be absent when the term is off; log_disabled evaluates it without grad.
    total, logs = bld_loss(tl, lab, bl, tgt, None, None, lambda_kl=0.0)
    assert "loss_kl" not in logs
    total, logs = bld_loss(tl, lab, bl, tgt, tq, tm, lambda_b=0.0, log_disabled=True)
    assert "loss_byte_ce" in logs and not logs["loss_byte_ce"].requires_grad
    total, logs = bld_loss(tl, lab, None, None, None, None, lambda_b=0.0, lambda_kl=0.0)
    assert set(logs) == {"loss_ce"}
    with pytest.raises(ValueError, match="loss_kl"):
        bld_loss(tl, lab, bl, tgt, None, None)
    with pytest.raises(ValueError):
        bld_loss(tl, lab, lambda_ce=0.0, lambda_b=0.0, lambda_kl=0.0)
