"""Liger Kernel in the student on a GPU (needs CUDA and liger_kernel; skipped without them):
`student.liger_layers` (RMSNorm, RoPE, SwiGLU) and `student.liger_fused_ce` against the plain
student, loss and gradients, the kernels compiled (not the CPU's Triton interpreter).

Tolerances. fp32 weights and activations: the kernels do the same float32 arithmetic in another
order (RMSNorm's mean of squares, the CE's log-sum-exp, the chunked head matmul, TF32 off), so
the loss agrees to 1e-5 relative and each parameter's gradient to 1e-4 of its largest entry
(two layers of ~1e-6 relative differences, amplified by the backward). bf16 autocast (what a GPU
run uses): both paths round their matmuls to bf16 (8 bits of mantissa) but at different points
(Liger's RMSNorm returns bf16 where transformers' multiplies by the fp32 weight; the fused CE
chunks its matmuls), so the loss to 1e-2 relative and the gradients' overall relative L2
difference to 5e-2; a wrong kernel, mask or reduction moves them by O(1).
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("liger_kernel")

from bld_scale.model.fused_loss import check_fusable  # noqa: E402
from bld_scale.model.liger_layers import apply_liger_layers  # noqa: E402
from bld_scale.model.student import build_student  # noqa: E402
from bld_scale.train.losses import token_ce  # noqa: E402

pytestmark = pytest.mark.gpu
V = 4096


def _pair(model_type: str, tied: bool = False):
    torch.manual_seed(0)
    config = dict(model_type=model_type, vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    plain = build_student(config, head_kind="causal", K=4, attn_implementation="sdpa").cuda()
    liger = copy.deepcopy(plain)
    apply_liger_layers(liger.lm)
    check_fusable(liger.lm)
    return plain, liger


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 300), generator=g)
    labels = torch.randint(0, V, (2, 300), generator=g)
    labels[1, 250:] = -100
    prev_bytes = torch.randint(0, 256, (2, 300, 4), generator=g)
    return ids.cuda(), labels.cuda(), prev_bytes.cuda()


def _losses(plain, liger, autocast: bool):
    ids, labels, prev_bytes = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, byte_plain = plain(input_ids=ids, prev_bytes=prev_bytes)
        want = token_ce(logits, labels) + byte_plain.float().square().mean()
        ce, byte_liger = liger(input_ids=ids, prev_bytes=prev_bytes, token_labels=labels)
        got = ce + byte_liger.float().square().mean()
    want.backward()
    got.backward()
    return float(want), float(got)


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_liger_student_matches_the_plain_one_in_fp32(model_type, tied):
    plain, liger = _pair(model_type, tied)
    want, got = _losses(plain, liger, autocast=False)
    assert got == pytest.approx(want, rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), liger.parameters()):
        assert p.grad is not None and q.grad is not None, name
        scale = float(p.grad.abs().max()) or 1.0
        assert float((p.grad - q.grad).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_liger_student_matches_the_plain_one_under_bf16_autocast(model_type):
    plain, liger = _pair(model_type)
    want, got = _losses(plain, liger, autocast=True)
    assert got == pytest.approx(want, rel=1e-2)
    diff = sum(float((p.grad - q.grad).float().square().sum()) for p, q in zip(plain.parameters(), liger.parameters()))
    norm = sum(float(p.grad.float().square().sum()) for p in plain.parameters())
    assert (diff / norm) ** 0.5 <= 5e-2


def test_bf16_weights_accumulate_the_head_gradient_in_fp32():
    """A bf16 student (the pipeline's ZeRO bf16 engine): the fused CE's head gradient against the
    plain one computed in fp32 from the same bf16 weights, to bf16 rounding of the result."""
    plain, liger = _pair("llama")
    plain, liger = plain.to(torch.bfloat16), liger.to(torch.bfloat16)
    ids, labels, prev_bytes = _batch()
    logits, _ = plain(input_ids=ids, prev_bytes=prev_bytes)
    token_ce(logits, labels).backward()
    ce, _ = liger(input_ids=ids, prev_bytes=prev_bytes, token_labels=labels)
    ce.backward()
    a, b = plain.lm.lm_head.weight.grad.float(), liger.lm.lm_head.weight.grad.float()
    assert float((a - b).norm() / a.norm()) <= 2e-2
