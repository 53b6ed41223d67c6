"""The conversion on a GPU equals the CPU's, on real vocabularies (needs CUDA; skipped without it).

Tekken (131,072 ids, padded to Qwen2's 151,936 rows; needs mistral-common) and the shipped demo
teacher's byte-level BPE (4,096 ids), real held-out text, log-probabilities shaped like a
language model's (a canonical next token that is often likely) and flat ones; both one-pass
modes, the batched form and bfloat16 input. max |dp| <= 1e-6: both devices sum float32
probabilities in float64, so they differ only by the order of float32 exps and float64 sums.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from bld_scale.convert import byte_logprobs, byte_logprobs_batch  # noqa: E402
from bld_scale.tokenize.token_bytes import TokenBytes  # noqa: E402
from synthetic_logits import window_logprobs

pytestmark = pytest.mark.gpu
TOLERANCE = 1e-6  # max |p_gpu - p_cpu|
LENGTH = 768  # teacher tokens per sequence


@pytest.fixture(scope="module", params=["tekken", "demo_teacher"])
def vocab_and_eos(request):
    if request.param == "tekken":
        pytest.importorskip("mistral_common")
        from bld_scale.tokenize.zoo import tekken

        return TokenBytes.from_tokenizer(tekken(), vocab_size=151_936), 2
    from transformers import AutoTokenizer

    from bld_scale.demo import demo_teacher_path

    tok = AutoTokenizer.from_pretrained(demo_teacher_path())
    return TokenBytes.from_tokenizer(tok), tok.eos_token_id


@pytest.fixture(scope="module")
def windows(vocab_and_eos, heldout_text):
    vocab, _ = vocab_and_eos
    ids, _ = vocab.encode(heldout_text[20_000:80_000])
    return [ids[:LENGTH], ids[LENGTH: 2 * LENGTH - 100]]  # two lengths: the batch pads


def logprobs(windows, vocab_size: int, peaked: bool, seed: int = 0) -> torch.Tensor:
    return window_logprobs(windows, vocab_size, peaked, seed)


def max_dp(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().exp() - b.double().exp()).abs().max())


@pytest.mark.parametrize("mode", ["cover", "within_token"])
@pytest.mark.parametrize("peaked", [True, False])
def test_one_sequence_gpu_equals_cpu(vocab_and_eos, windows, mode, peaked):
    vocab, eos = vocab_and_eos
    lp = logprobs(windows[:1], vocab.vocab_size, peaked)[0]
    cpu = byte_logprobs(lp, windows[0], vocab, eos_id=eos, mode=mode)
    gpu = byte_logprobs(lp.cuda(), windows[0], vocab, eos_id=eos, mode=mode)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    gpu = gpu.cpu()
    assert torch.equal(torch.isfinite(gpu), torch.isfinite(cpu))
    assert max_dp(gpu, cpu) <= TOLERANCE


def test_batch_gpu_equals_cpu(vocab_and_eos, windows):
    vocab, eos = vocab_and_eos
    lp = logprobs(windows, vocab.vocab_size, peaked=True, seed=1)
    cpu, cpu_mask = byte_logprobs_batch(lp, windows, vocab, eos_id=eos)
    gpu, gpu_mask = byte_logprobs_batch(lp.cuda(), windows, vocab, eos_id=eos)
    assert torch.equal(gpu_mask.cpu(), cpu_mask)
    assert torch.equal(torch.isfinite(gpu.cpu()), torch.isfinite(cpu))
    assert max_dp(gpu.cpu(), cpu) <= TOLERANCE


def test_bfloat16_input_gpu_equals_cpu(vocab_and_eos, windows):
    vocab, eos = vocab_and_eos
    lp = logprobs(windows[:1], vocab.vocab_size, peaked=True, seed=2)[0].bfloat16()
    cpu = byte_logprobs(lp, windows[0], vocab, eos_id=eos)
    gpu = byte_logprobs(lp.cuda(), windows[0], vocab, eos_id=eos).cpu()
    assert max_dp(gpu, cpu) <= TOLERANCE
