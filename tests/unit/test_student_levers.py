"""Student speed levers leave the numbers as they were: activation checkpointing
(train.activation_checkpointing) and torch.compile (train.compile), alone and under ZeRO-3."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from bld_scale.model.recompute import enable_activation_checkpointing
from bld_scale.model.student import build_student
from launching import REPO, rank_env

TINY = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _loss_and_grads(student, ids, prev):
    token_logits, byte_logits = student(input_ids=ids, attention_mask=torch.ones_like(ids), prev_bytes=prev)
    loss = torch.nn.functional.cross_entropy(token_logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)) \
        + byte_logits.logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters()}


def test_activation_checkpointing_recomputes_the_layers_and_keeps_loss_and_gradients():
    """Causal byte head on the checkpointed backbone: the recomputation repeats the same float32
    operations on the same inputs, so loss and every gradient are bit-identical; a pre-forward hook
    counts the recomputation (each layer's MLP starts twice per step), so the test fails if it is off."""
    torch.manual_seed(0)
    plain = build_student(TINY, head_kind="causal", K=4, attn_implementation="sdpa",
                          head_size={"width": 16, "layers": 1}).train()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    calls = {"plain": 0, "ckpt": 0}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        model.lm.model.layers[1].mlp.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    prev = torch.randint(0, 256, (2, 12, 4), generator=torch.Generator().manual_seed(2))
    loss_a, grads_a = _loss_and_grads(plain, ids, prev)
    loss_b, grads_b = _loss_and_grads(ckpt, ids, prev)
    assert calls == {"plain": 1, "ckpt": 2}
    assert loss_a.item() == loss_b.item()
    for name, grad in grads_a.items():
        assert grad is not None and torch.equal(grad, grads_b[name]), name


def test_a_model_without_checkpointing_support_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_zero3_engines_with_checkpointing_compile_or_the_fused_head_train_as_the_plain_one():
    """One rank, two ZeRO-3 student engines built by build_student_engine from recipes: plain, and
    with activation checkpointing + train.compile (DeepSpeed's engine.compile, backend aot_eager:
    the same forward and backward graphs as inductor's, without generating kernels, so CI needs
    no C compiler and seconds, not minutes). Two optimizer steps (two sequence lengths, so a
    recompilation too): losses within 1e-6 relative and full gradients within 1e-6 absolute
    (aot_eager's decompositions may reorder float32 sums; measured <= 1e-7)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "student_levers_zero3.py")],
                          cwd=REPO, env=dict(rank_env(), TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["compiled"] and result["checkpointed"]
    assert result["loss"]["levers"] == pytest.approx(result["loss"]["plain"], rel=1e-6)
    assert max(result["grad_max_diff_levers"]) < 1e-6
    # student.liger_fused_ce on the same engine kind: every parameter partitioned, so a token head
    # weight that were not gathered would be empty; Liger's float32 chunked sums: 1e-5 (test_liger.py)
    assert result["loss"]["fused"] == pytest.approx(result["loss"]["plain"], rel=1e-5)
    assert max(result["grad_max_diff_fused"]) < 1e-5
