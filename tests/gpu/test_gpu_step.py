"""One distillation step in bf16 on a GPU (needs CUDA; skipped without it).

The demo recipe's parts built as the pipeline builds them (`bld_scale.train.setup`): the shipped
teacher in bf16 (what teacher.dtype auto gives on a GPU), the student in fp32 under bf16
autocast, a batch of real windows. Each method's loss is finite, every trainable parameter gets a
finite gradient (the byte head's not all zero under `bld`), and each loss term matches the same
step in fp32 on the CPU to 2e-3 relative: the same comparison with bf16 autocast on the CPU moves
them by at most 3.4e-5 (byte CE; token CE 2e-6, KL 2e-5), GPU kernels round a little differently,
and a wrong target, mask or weighting moves a term by far more.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from bld_scale.config import load_recipe  # noqa: E402
from bld_scale.data.batch import PairTokenizer, collate  # noqa: E402
from bld_scale.data.corpus import load_works  # noqa: E402
from bld_scale.data.batch import split_windows  # noqa: E402
from bld_scale.train.setup import seed_everything, setup_student, setup_tokenizers  # noqa: E402
from bld_scale.train.step import distill_step  # noqa: E402
from launching import REPO  # noqa: E402

pytestmark = pytest.mark.gpu
RTOL = 2e-3  # bf16 autocast against fp32 (see the module docstring)


@pytest.fixture(scope="module")
def parts():
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(REPO / "launch" / "recipes" / "demo.yaml", ["student.attn_implementation=sdpa"])
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher.path, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    sides = setup_tokenizers(recipe, teacher.config.vocab_size, log=lambda _: None)
    seed_everything(0)
    student = setup_student(recipe, len(sides.student_tok))
    text = "\n".join(load_works("train").values())
    windows = split_windows(text, recipe.data.window_bytes)[40:44]
    pair = PairTokenizer(sides.teacher_vocab, sides.student_vocab)
    batch = collate([pair(w) for w in windows], recipe.student.K, sides.teacher_bos, sides.student_bos)
    return recipe, teacher, sides, student, batch


def step(recipe, teacher, sides, student, batch, method: str, device: str):
    # a copy: the fixture's fp32 teacher must not come back from the GPU rounded to bf16
    teacher = copy.deepcopy(teacher).to(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    student = student.to(device)
    student.zero_grad(set_to_none=True)
    batch = batch.to(device)
    cfg = dataclasses.replace(recipe.distill, method=method)

    def teacher_forward(ids, mask):
        return teacher(input_ids=ids, attention_mask=mask).logits

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, logs = distill_step(teacher_forward, student, batch, cfg, teacher_vocab=sides.teacher_vocab,
                                  teacher_eos_id=sides.teacher_eos)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() if p.grad is not None else None
             for n, p in student.named_parameters() if p.requires_grad}
    return float(loss.detach()), {k: float(v) for k, v in logs.items()}, grads


@pytest.mark.parametrize("method", ["bld", "ce"])
def test_bf16_step_gives_finite_loss_and_gradients(parts, method):
    recipe, teacher, sides, student, batch = parts
    loss, logs, grads = step(recipe, teacher, sides, student, batch, method, "cuda")
    assert math.isfinite(loss) and all(math.isfinite(v) for v in logs.values()), logs
    if method == "bld":
        assert logs["loss_kl"] > 0 and logs["loss_byte_ce"] > 0
    missing = [n for n, g in grads.items() if g is None and (method == "bld" or not n.startswith("byte_head"))]
    assert not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    head = [g for n, g in grads.items() if n.startswith("byte_head") and g is not None]
    if method == "bld":
        assert head and any(g.abs().sum() > 0 for g in head)


@pytest.mark.parametrize("method", ["bld", "ce"])
def test_bf16_step_matches_fp32_on_cpu(parts, method):
    recipe, teacher, sides, student, batch = parts
    gpu_loss, gpu_logs, _ = step(recipe, teacher, sides, student, batch, method, "cuda")
    cpu_loss, cpu_logs, _ = step(recipe, teacher, sides, student, batch, method, "cpu")
    assert gpu_loss == pytest.approx(cpu_loss, rel=RTOL)
    for key in ("loss_ce", "loss_byte_ce", "loss_kl"):
        if key in cpu_logs:
            assert gpu_logs[key] == pytest.approx(cpu_logs[key], rel=RTOL), key
