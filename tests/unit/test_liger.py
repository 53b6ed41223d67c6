"""Liger Kernel in the student (`student.liger_fused_ce`, `student.liger_layers`), on the CPU.

Liger's kernels are Triton kernels; here they run under the Triton interpreter
(`TRITON_INTERPRET=1`, set before triton and liger_kernel are first imported; in a session where
triton was already imported without it, the interpreted tests run in a child pytest, as in
test_triton_conversion.py). liger-kernel 0.8.5 under triton 3.9: the fused linear cross-entropy
and RoPE run in the interpreter; RMSNorm and SwiGLU do not (a float argument reaches `.to()`), so
their numbers are checked on a GPU (tests/gpu/test_liger_gpu.py) and here only how they are bound.

Tolerances (float32 throughout). The fused CE computes the same float32 log-sum-exp per row as
`F.cross_entropy` but in Triton's order, and the head's matmul chunk by chunk: the loss agrees to
a few float32 ulps (rel 1e-6), and each gradient to 1e-5 of its largest entry (sums over ~100
tokens of terms each within ~1e-7 relative). Liger's RoPE does the same multiply-adds as
transformers' (measured: bitwise equal here); the same 1e-5 bounds are used.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch

with pytest.MonkeyPatch.context() as _env:
    _env.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    import liger_kernel.ops.cross_entropy as liger_ops
# both triton's own standard library (defined at `import triton`) and Liger's kernels interpreted
INTERPRETED = all(isinstance(f, InterpretedFunction)
                  for f in (triton.language.standard.zeros, liger_ops.liger_cross_entropy_kernel))

from bld_scale.config import DistillConfig, RecipeError, load_recipe, validate_liger  # noqa: E402
from bld_scale.data.batch import PairTokenizer, collate, split_windows  # noqa: E402
from bld_scale.data.packing import pack  # noqa: E402
from bld_scale.model.fused_loss import fused_ce_problem  # noqa: E402
from bld_scale.model.student import build_student  # noqa: E402
from bld_scale.tokenize.token_bytes import TokenBytes  # noqa: E402
from bld_scale.train.losses import token_ce  # noqa: E402
from bld_scale.train.step import distill_step  # noqa: E402

LOSS_RTOL = 1e-6
GRAD_TOL = 1e-5  # of each gradient's largest entry
interpreted = pytest.mark.skipif(not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1 in this "
                                 "session: test_module_under_the_interpreter runs this test in a child pytest")


@pytest.mark.skipif(INTERPRETED, reason="this session interprets: the tests run here directly")
def test_module_under_the_interpreter():
    """This module in a fresh pytest under TRITON_INTERPRET=1 (~30 s)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "not test_module_under_the_interpreter"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """TRITON_INTERPRET=1 while this module's tests run: triton reads it again at each launch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _config(model_type: str, vocab: int, tied: bool = False, hidden: int = 32, layers: int = 2) -> dict:
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def _assert_same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = float(q.grad.abs().max()) or 1.0
            assert float((p.grad - q.grad).abs().max()) <= GRAD_TOL * scale, name


# ---------------------------------------------------------------------- the fused CE
@interpreted
@pytest.mark.parametrize("model_type, tied", [("llama", True), ("qwen2", False)])
def test_fused_ce_matches_the_token_ce_of_the_logits(model_type, tied):
    torch.manual_seed(0)
    plain = build_student(_config(model_type, 97, tied), head_kind="linear", K=3)
    fused = copy.deepcopy(plain)
    ids = torch.randint(0, 97, (2, 23))
    labels = torch.randint(0, 97, (2, 23))
    labels[0, :5] = -100
    labels[1, -7:] = -100
    token_logits, byte_plain = plain(input_ids=ids)
    want = token_ce(token_logits, labels)
    got, byte_fused = fused(input_ids=ids, token_labels=labels)
    assert got.dim() == 0 and float(got.detach()) == pytest.approx(float(want.detach()), rel=LOSS_RTOL)
    torch.testing.assert_close(byte_fused, byte_plain, rtol=0, atol=0)  # same hidden states
    (want + byte_plain.square().mean()).backward()
    (got + byte_fused.square().mean()).backward()
    _assert_same_grads(fused, plain)


@interpreted
def test_fused_ce_of_no_counted_label_is_zero_and_trains_nothing():
    torch.manual_seed(0)
    student = build_student(_config("llama", 97), head_kind="linear", K=3)
    ce, _ = student(input_ids=torch.randint(0, 97, (1, 9)), token_labels=torch.full((1, 9), -100))
    assert float(ce.detach()) == 0.0 and ce.requires_grad  # as token_ce: 0, still attached
    ce.backward()
    assert float(student.lm.lm_head.weight.grad.abs().max()) == 0.0


@pytest.fixture(scope="module")
def demo_pair():
    """The shipped tokenizers (teacher byte-level BPE, student SentencePiece), a tiny random teacher
    of the teacher's vocabulary, and three short windows of the shipped text."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bld_scale.data.corpus import load_works
    from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR

    t_tok, s_tok = AutoTokenizer.from_pretrained(TEACHER_DIR), AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    t_vocab, s_vocab = TokenBytes.from_tokenizer(t_tok), TokenBytes.from_tokenizer(s_tok)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=t_vocab.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    windows = split_windows(next(iter(load_works("train").values()))[:2000], 100)[:2]
    pair = PairTokenizer(t_vocab, s_vocab)
    return teacher, t_vocab, s_vocab, [pair(w) for w in windows], (t_tok.eos_token_id, s_tok.bos_token_id)


@interpreted
@pytest.mark.parametrize("method, layout", [("ce", collate), ("bld", pack)])  # ~5 s each
def test_distill_step_with_the_fused_head_gives_the_same_loss_and_gradients(demo_pair, method, layout):
    teacher, t_vocab, s_vocab, examples, (t_bos, s_bos) = demo_pair
    batch = layout(examples, 4, t_bos, s_bos)
    torch.manual_seed(1)
    # width 128: Liger's chunks hold ~BT x H logits, fewer (interpreted) launches than at width 32
    plain = build_student(_config("llama", s_vocab.vocab_size, hidden=128), head_kind="causal", K=4)
    fused = copy.deepcopy(plain)
    cfg = DistillConfig(method=method)

    def forward(ids, mask, position_ids=None):
        return teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits

    want, want_logs = distill_step(forward, plain, batch, cfg, teacher_vocab=t_vocab)
    got, got_logs = distill_step(forward, fused, batch, cfg, teacher_vocab=t_vocab, fused_token_ce=True)
    assert set(got_logs) == set(want_logs)
    for key in want_logs:
        assert float(got_logs[key]) == pytest.approx(float(want_logs[key]), rel=LOSS_RTOL), key
    want.backward()
    got.backward()
    _assert_same_grads(fused, plain)


# ---------------------------------------------------------------------- the layers
@interpreted
def test_liger_rope_serves_the_student_and_not_a_teacher_of_its_family(monkeypatch):
    import liger_kernel.transformers.rope as liger_rope
    from transformers.models.llama import modeling_llama

    from bld_scale.model.liger_layers import apply_liger_layers, uses_liger_rope

    calls = []
    real = liger_rope.liger_rotary_pos_emb
    monkeypatch.setattr(liger_rope, "liger_rotary_pos_emb", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = build_student(_config("llama", 97, layers=1), head_kind="linear", K=3)
    patched, teacher = copy.deepcopy(plain), copy.deepcopy(plain.lm)
    apply_liger_layers(patched.lm, rms_norm=False, swiglu=False)  # RoPE alone: it runs in the interpreter
    assert all(uses_liger_rope(layer.self_attn) for layer in patched.lm.model.layers)
    ids = torch.randint(0, 97, (2, 9))
    token_plain, _ = plain(input_ids=ids)
    token_patched, _ = patched(input_ids=ids)
    assert len(calls) == 1  # once per student layer
    teacher(input_ids=ids)
    assert len(calls) == 1 and modeling_llama.apply_rotary_pos_emb is not liger_rope.liger_rotary_pos_emb
    torch.testing.assert_close(token_patched, token_plain, rtol=LOSS_RTOL, atol=0)
    token_plain.square().mean().backward()
    token_patched.square().mean().backward()
    _assert_same_grads(patched, plain)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_liger_norms_and_mlps_are_bound_to_this_student_only(monkeypatch, model_type):
    """How the layers are patched, without running RMSNorm and SwiGLU (CUDA only): the CUDA check
    is stood in for; each of this student's norms and MLPs has Liger's forward, the attention
    Liger's RoPE, the modeling module's names are untouched, and a model built after is plain."""
    import importlib
    import sys

    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import AutoConfig, AutoModelForCausalLM

    import bld_scale.model.liger_layers as liger_layers

    monkeypatch.setattr(liger_layers, "liger_problem", lambda needs_cuda: None)
    config = AutoConfig.for_model(**_config(model_type, 97))
    lm = AutoModelForCausalLM.from_config(config)
    modeling = importlib.import_module(type(lm).__module__)
    names = dict(vars(modeling))
    liger_layers.apply_liger_layers(lm)
    assert {k: v for k, v in vars(modeling).items()} == names and all(vars(modeling)[k] is v for k, v in names.items())
    norms = [m for name, m in lm.named_modules() if "norm" in name.rsplit(".", 1)[-1]]
    assert len(norms) >= 2 * config.num_hidden_layers + 1
    assert all(m.forward.__func__ is LigerRMSNorm.forward for m in norms)
    for layer in lm.model.layers:
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
        assert liger_layers.uses_liger_rope(layer.self_attn)
    copied = copy.deepcopy(lm)  # each bound forward follows its copy
    assert all(layer.self_attn.forward.__self__ is layer.self_attn for layer in copied.model.layers)
    fresh = AutoModelForCausalLM.from_config(config)
    assert not any("forward" in vars(m) for m in fresh.modules())
    assert sys.modules[type(fresh).__module__] is modeling


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, message", [
    (["distill.method=uld"], "distill.method 'uld' reads the token logits"),
    (["distill.method=dskd"], "distill.method 'dskd' reads the token logits"),
    (["parallel.sequence_parallel=2"], "parallel.sequence_parallel > 1"),
])
def test_recipes_the_fused_head_cannot_serve_are_refused(overrides, message):
    with pytest.raises(RecipeError, match="student.liger_fused_ce") as err:
        load_recipe(None, ["student.liger_fused_ce=true", *overrides], check_paths=False)
    assert message in str(err.value) and "set it to false" in str(err.value)


def test_the_step_refuses_the_fused_head_for_a_method_that_reads_logits(demo_pair):
    teacher, t_vocab, s_vocab, examples, (t_bos, s_bos) = demo_pair
    batch = collate(examples, 4, t_bos, s_bos)
    student = build_student(_config("llama", s_vocab.vocab_size), head_kind="linear", K=4)
    with pytest.raises(ValueError, match="student.liger_fused_ce.*'token_kd' reads the logits"):
        distill_step(lambda *a: None, student, batch, DistillConfig(method="token_kd"), fused_token_ce=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs Liger")
def test_a_cpu_machine_is_refused_without_the_interpreter_and_always_for_the_layers(monkeypatch):
    recipe = load_recipe(None, ["student.liger_fused_ce=true"], check_paths=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecipeError, match=r"student.liger_fused_ce: .*no CUDA device.*TRITON_INTERPRET=1"):
        validate_liger(recipe)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    validate_liger(recipe)  # the interpreter runs the fused CE (slowly): tests do
    layers = load_recipe(None, ["student.liger_layers=true"], check_paths=False)
    with pytest.raises(RecipeError, match=r"student.liger_layers: .*RMSNorm and SwiGLU do not run in the Triton "
                                          r"interpreter.*set student.liger_layers=false"):
        validate_liger(layers)


def test_a_head_with_soft_capping_is_not_fused():
    gemma2 = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gemma2"))
    assert "'gemma2'" in fused_ce_problem(gemma2)
