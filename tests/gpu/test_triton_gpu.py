"""Conversion backend "triton" equals backend "torch" on a GPU (needs CUDA and triton; skipped without).

Tekken (131,072 ids, padded to Qwen2's 151,936 rows; needs mistral-common), L = 512 real held-out
tokens, log-probabilities shaped like a language model's (peaked) and flat ones, float32 and
bfloat16, one sequence and the batched form. Tolerances as tests/unit/test_triton_conversion.py
(which runs the same kernels under the Triton interpreter on the CPU): probabilities to 2e-7,
log-probabilities where the probability exceeds 1e-12 to 1e-6 + 2e-7 |log p| + 2e-9 / p. Run in
its own pytest session if the unit tests ran first (they import triton in interpreter mode).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.standard.zeros, InterpretedFunction):
    pytest.skip("triton was imported under TRITON_INTERPRET=1 in this session: run the GPU tests in "
                "their own pytest session", allow_module_level=True)

from bld_scale.convert import byte_logprobs, byte_logprobs_batch  # noqa: E402
from bld_scale.convert.backends import running_sums_class  # noqa: E402
from bld_scale.convert.triton_sums import TritonRunningSums  # noqa: E402
from bld_scale.tokenize.token_bytes import TokenBytes  # noqa: E402
from synthetic_logits import window_logprobs  # noqa: E402

pytestmark = pytest.mark.gpu
P_TOLERANCE = 2e-7
LENGTH = 512


@pytest.fixture(scope="module")
def tekken_vocab():
    pytest.importorskip("mistral_common")
    from bld_scale.tokenize.zoo import tekken

    return TokenBytes.from_tokenizer(tekken(), vocab_size=151_936)


@pytest.fixture(scope="module")
def windows(tekken_vocab, heldout_text):
    ids, _ = tekken_vocab.encode(heldout_text[20_000:60_000])
    return [ids[:LENGTH], ids[LENGTH: 2 * LENGTH - 100]]


def logprobs(windows, vocab_size: int, peaked: bool, seed: int = 0) -> torch.Tensor:
    return window_logprobs(windows, vocab_size, peaked, seed).cuda()


def assert_backends_agree(triton_out, torch_out):
    assert triton_out.is_cuda and triton_out.shape == torch_out.shape
    a, b = triton_out.double().cpu(), torch_out.double().cpu()
    assert float((a.exp() - b.exp()).abs().max()) <= P_TOLERANCE
    p = b.exp()
    big = p > 1e-12
    bound = 1e-6 + 2e-7 * b[big].abs() + 2e-9 / p[big]
    assert bool(((a[big] - b[big]).abs() <= bound).all())


def test_auto_picks_triton_on_cuda():
    assert running_sums_class("auto", torch.device("cuda")) is TritonRunningSums


@pytest.mark.parametrize("mode", ["cover", "within_token"])
@pytest.mark.parametrize("peaked", [True, False])
def test_one_sequence_triton_equals_torch(tekken_vocab, windows, mode, peaked):
    lp = logprobs(windows[:1], tekken_vocab.vocab_size, peaked)[0]
    got = byte_logprobs(lp, windows[0], tekken_vocab, eos_id=2, mode=mode, backend="triton")
    ref = byte_logprobs(lp, windows[0], tekken_vocab, eos_id=2, mode=mode, backend="torch")
    assert_backends_agree(got, ref)


def test_batch_and_bfloat16_triton_equals_torch(tekken_vocab, windows):
    lp = logprobs(windows, tekken_vocab.vocab_size, peaked=True, seed=1)
    for x in (lp, lp.bfloat16()):
        got, got_mask = byte_logprobs_batch(x, windows, tekken_vocab, eos_id=2, backend="triton")
        ref, ref_mask = byte_logprobs_batch(x, windows, tekken_vocab, eos_id=2, backend="torch")
        assert torch.equal(got_mask, ref_mask)
        assert_backends_agree(got, ref)
