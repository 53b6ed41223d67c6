"""teacher.placement: the arithmetic `auto` decides by (bld_scale.parallel.placement / memory), on
given memory numbers, and the replicated teacher as the pipeline calls it. The launched runs that
compare zero3 and replicate step by step are in tests/integration/test_pipeline.py and test_checkpoint.py."""
from __future__ import annotations

import pytest
import torch

from bld_scale.config import load_recipe
from bld_scale.parallel import memory
from bld_scale.parallel.placement import MARGIN, RESERVED_BYTES, choose_placement, fits_replicated, replicate_teacher
from tiny_models import tiny_llama

# The issue's shapes (tools/gpu_check_assets.py): a Qwen2-1.5B teacher, a Llama-3.2-1B student.
QWEN2_1_5B = dict(model_type="qwen2", vocab_size=151_936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
LLAMA_3_2_1B = dict(model_type="llama", vocab_size=32_000, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


def _numbers(teacher, student_none, student_optimizer, activations, offload="none") -> dict:
    """An estimate as `memory.estimate` shapes it, with the figures given (bytes)."""
    return {"teacher": {"states": {"replicate": {"gpu": teacher}}},
            "student": {"offload": offload, "states": {"none": {"gpu": student_none},
                                                       "optimizer": {"gpu": student_optimizer}}},
            "activations": {"a": activations / 2, "b": activations / 2}}


def test_auto_replicates_when_teacher_student_and_activations_fit_with_the_margin():
    e = _numbers(3.1e9, 22e9, 4e9, 20e9)
    need = (3.1e9 + 22e9 + 20e9) * 1.2 + 3e9  # the stated margin: x1.2, 3 GB reserved
    assert (MARGIN, RESERVED_BYTES) == (0.2, 3e9)
    assert fits_replicated(e, need)[0] and not fits_replicated(e, need - 1e6)[0]
    fits, words = fits_replicated(e, 80e9)
    assert fits and "= 57.1 GB <= 80.0 GB" in words, words
    assert choose_placement("auto", True, lambda: e, 80e9).name == "replicate"
    assert choose_placement("auto", True, lambda: e, 40e9).name == "zero3"
    # an offloaded optimizer leaves the student's share at its offloaded figure
    off = _numbers(3.1e9, 22e9, 4e9, 20e9, offload="optimizer")
    assert choose_placement("auto", True, lambda: off, 40e9).name == "replicate"  # (3.1+4+20)*1.2+3 = 35.5


def test_auto_keeps_zero3_on_cpu_and_a_set_placement_is_kept():
    def never():
        raise AssertionError("the arithmetic is for auto on a GPU only")

    cpu = choose_placement("auto", False, never)
    assert cpu.name == "zero3" and "CPU" in cpu.reason
    for name in ("zero3", "replicate"):
        assert choose_placement(name, True, never, 1).name == name
    with pytest.raises(ValueError, match="teacher.placement"):
        choose_placement("gpu", True, never, 1)


def test_the_issue_shapes_replicate_on_an_h200_and_not_on_a_24_gb_gpu():
    """Qwen2-1.5B (bf16, 3.1 GB whole) beside a Llama-3.2-1B student, 4 windows of 8 KiB, one GPU."""
    recipe = load_recipe(None, ["train.micro_batch_size=4", "data.window_bytes=8192", "teacher.dtype=bf16"],
                         check_paths=False)
    e = memory.estimate(recipe, 1, 1, QWEN2_1_5B, LLAMA_3_2_1B)
    t = e["teacher"]
    assert t["states"]["replicate"]["gpu"] == 2 * t["params"] and 1.5e9 < t["params"] < 1.6e9
    assert choose_placement("auto", True, lambda: e, 141e9).name == "replicate"
    assert choose_placement("auto", True, lambda: e, 24e9).name == "zero3"


def test_the_fused_conversion_writes_no_teacher_log_softmax_at_sequence_parallel_1():
    """`bld` cover at SP=1 reads the raw logits (dispatch.teacher_token_logits); another method, or the
    SP step, writes a float32 copy and a float32 log-softmax: 8 more bytes per bf16 logit."""
    base = ["train.micro_batch_size=2", "data.window_bytes=4400", "teacher.dtype=bf16"]
    logits = 2 * (4400 / 4.4 + 1) * QWEN2_1_5B["vocab_size"]  # B x (tokens + BOS) x vocab
    fused = memory.estimate(load_recipe(None, base, check_paths=False), 1, 2, QWEN2_1_5B, LLAMA_3_2_1B)
    assert fused["activations"]["teacher logits"] == pytest.approx(2 * logits)
    assert "teacher fp32 log-softmax" not in fused["activations"]
    sp = memory.estimate(load_recipe(None, base, check_paths=False), 1, 2, QWEN2_1_5B, LLAMA_3_2_1B,
                         sequence_parallel=2)
    assert sp["activations"]["teacher fp32 log-softmax"] == pytest.approx(8 * logits / 2)
    uld = memory.estimate(load_recipe(None, [*base, "distill.method=uld"], check_paths=False), 1, 2,
                          QWEN2_1_5B, LLAMA_3_2_1B)
    assert uld["activations"]["teacher fp32 log-softmax"] == pytest.approx(8 * logits)


def test_activation_checkpointing_keeps_each_layer_input_and_one_layer():
    base = ["train.micro_batch_size=1", "data.window_bytes=3700"]
    plain, ckpt = (memory.estimate(load_recipe(None, base + more, check_paths=False), 1, 1, QWEN2_1_5B,
                                   LLAMA_3_2_1B)["activations"]["student layers"]
                   for more in ([], ["train.activation_checkpointing=true"]))
    tokens, h, layers = 3700 / 3.7, 2048, 16
    assert plain == pytest.approx(34 * h * tokens * layers)
    assert ckpt == pytest.approx(2 * h * tokens * layers + 34 * h * tokens)


def test_a_replicated_teacher_is_called_like_the_engine_and_stays_frozen():
    model = tiny_llama(64)
    ids = torch.tensor([[1, 5, 9, 12]])
    want = model(input_ids=ids).logits
    teacher = replicate_teacher(model, torch.device("cpu"))
    teacher.train()  # a caller switching modes does not unfreeze it
    assert teacher.module is model and not model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        got = teacher(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_placement_for_a_gpu_run_reads_the_device_memory_and_the_launchers_gpus_per_node(monkeypatch):
    """The pipeline's glue (`placement_for`) on a pretend GPU: the device's total memory and
    LOCAL_WORLD_SIZE feed the arithmetic (8 ranks on one node: the student's ZeRO-3 share is 1/8)."""
    from types import SimpleNamespace

    from bld_scale.parallel.placement import placement_for

    recipe = load_recipe(None, ["train.micro_batch_size=4", "data.window_bytes=8192", "teacher.dtype=bf16"],
                         check_paths=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for memory_bytes, want in ((141e9, "replicate"), (20e9, "zero3")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, m=memory_bytes: SimpleNamespace(total_memory=m))
        got = placement_for(recipe, 8, QWEN2_1_5B, LLAMA_3_2_1B, torch.device("cuda", 0))
        e = memory.estimate(recipe, 1, 8, QWEN2_1_5B, LLAMA_3_2_1B)
        assert got.name == want and got.reason == "auto: " + fits_replicated(e, memory_bytes)[1]
