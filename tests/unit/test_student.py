"""Student = HF causal LM + byte head, built from tiny configs of four architectures."""
import importlib.util

import pytest
import torch

from bld_scale.train.losses import bld_loss, byte_ce
from bld_scale.model.student import Student, build_student, load_student, pick_attn_implementation
from bld_scale.model.heads import build_byte_head

VOCAB, K = 96, 4
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = {
    "llama": {"model_type": "llama", **TINY},
    "qwen2": {"model_type": "qwen2", **TINY},
    "mistral": {"model_type": "mistral", "sliding_window": 8, **TINY},
    "gemma": {"model_type": "gemma", "head_dim": 8, **TINY},
}
SMALL_CAUSAL = {"width": 16, "layers": 1, "heads": 2}


def _student(arch="llama", kind="causal", attn="sdpa", seed=0):
    torch.manual_seed(seed)
    head_size = SMALL_CAUSAL if kind == "causal" else None
    return build_student(CONFIGS[arch], kind, K, attn_implementation=attn, head_size=head_size).eval()


def _batch(seed=0, batch=2, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    prev_bytes = torch.randint(0, 256, (batch, length, K), generator=g)
    prev_bytes[0, 1, 2:] = -100
    return ids, mask, prev_bytes


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_student_runs_and_head_reads_final_hidden_state(arch):
    student = _student(arch)
    ids, mask, prev_bytes = _batch()
    with torch.no_grad():
        token_logits, byte_logits = student(ids, mask, prev_bytes)
        out = student.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        base = student.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert token_logits.shape == (2, 6, VOCAB) and byte_logits.shape == (2, 6, K, 257)
    torch.testing.assert_close(token_logits, out.logits)
    # transformers v5: hidden_states[-1] is the final-norm output, the same as last_hidden_state.
    torch.testing.assert_close(out.hidden_states[-1], base)
    torch.testing.assert_close(byte_logits, student.byte_head(base, prev_bytes))


@pytest.mark.parametrize("kind", ["linear", "causal"])
def test_byte_loss_alone_reaches_backbone(kind):
    student = _student("qwen2", kind).train()
    ids, mask, prev_bytes = _batch()
    _, byte_logits = student(ids, mask, prev_bytes)
    byte_ce(byte_logits, prev_bytes).backward()
    for layer in student.lm.get_decoder().layers:
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in layer.parameters())
    assert torch.count_nonzero(student.lm.get_input_embeddings().weight.grad) > 0


def test_switched_off_term_leaves_student_gradients_unchanged():
    student = _student("llama").train()
    ids, mask, prev_bytes = _batch()
    labels = torch.roll(ids, -1, dims=1)
    teacher = torch.log_softmax(torch.randn(2, 6, K, 257), -1)

    def grads(**kw):
        student.zero_grad(set_to_none=True)
        token_logits, byte_logits = student(ids, mask, prev_bytes)
        total, _ = bld_loss(token_logits, labels, byte_logits, prev_bytes, **kw)
        total.backward()
        return [p.grad.clone() for p in student.parameters()]

    off = grads(teacher_logq=teacher * 7 + 3, teacher_mask=prev_bytes != -100, lambda_kl=0.0)
    absent = grads(lambda_kl=0.0)
    on = grads(teacher_logq=teacher, teacher_mask=prev_bytes != -100, lambda_kl=0.5)
    assert all(torch.equal(a, b) for a, b in zip(off, absent))
    assert any(not torch.equal(a, b) for a, b in zip(off, on))


def test_save_load_round_trip(tmp_path):
    student = _student("gemma")
    ids, mask, prev_bytes = _batch()
    student.save(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "byte_head.json").exists()
    loaded = load_student(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.lm.config._attn_implementation == "sdpa"
    with torch.no_grad():
        expected, got = student(ids, mask, prev_bytes), loaded(ids, mask, prev_bytes)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    # A saved LM also serves as the pretrained start of a new student (fresh head).
    fresh = build_student(None, "linear", K, attn_implementation="sdpa", pretrained=tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask)[0], expected[0])


def test_left_padding_keeps_real_positions():
    student = _student("mistral")
    ids, _, prev_bytes = _batch(batch=1)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    pad_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    pad_bytes = torch.cat([torch.full((1, 2, K), -100), prev_bytes], 1)
    with torch.no_grad():
        plain = student(ids, torch.ones_like(ids), prev_bytes)
        shifted = student(padded, pad_mask, pad_bytes)
    torch.testing.assert_close(shifted[0][:, 2:], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifted[1][:, 2:], plain[1], rtol=1e-4, atol=1e-4)


def test_attention_implementation_choice():
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        assert pick_attn_implementation("auto") == "sdpa"
        with pytest.raises(RuntimeError, match="flash_attn"):
            pick_attn_implementation("flash_attention_2")
    assert pick_attn_implementation("sdpa") == "sdpa" and pick_attn_implementation("eager") == "eager"
    with pytest.raises(ValueError):
        pick_attn_implementation("flex")
    ids, mask, prev_bytes = _batch()
    with torch.no_grad():
        sdpa = _student("llama", attn="sdpa")(ids, mask, prev_bytes)
        eager = _student("llama", attn="eager")(ids, mask, prev_bytes)
    torch.testing.assert_close(sdpa[0], eager[0], rtol=1e-4, atol=1e-5)


def test_build_errors():
    with pytest.raises(ValueError, match="model_type"):
        build_student({k: v for k, v in CONFIGS["llama"].items() if k != "model_type"})
    with pytest.raises(ValueError):
        Student(_student().lm, build_byte_head("linear", 33, K))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs CUDA and flash_attn")
def test_flash_attention_matches_sdpa_on_gpu():
    ids, mask, prev_bytes = (t.cuda() for t in _batch(length=32))
    mask[1, :5] = 0  # left padding exercises flash's unpadding path
    outputs = []
    for attn in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        student = build_student(CONFIGS["llama"], "causal", K, attn_implementation=attn,
                                head_size=SMALL_CAUSAL, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            outputs.append(student(ids, mask, prev_bytes))
    keep = mask.bool()
    torch.testing.assert_close(outputs[0][0][keep].float(), outputs[1][0][keep].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outputs[0][1][keep].float(), outputs[1][1][keep].float(), rtol=2e-2, atol=2e-2)
