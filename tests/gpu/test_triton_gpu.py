"""Conversion backend "triton" equals backend "torch" on a GPU (needs CUDA and triton; skipped without).

Tekken (131,072 ids, padded to Qwen2's 151,936 rows; needs mistral-common), L = 512 real held-out
tokens, log-probabilities shaped like a language model's (peaked) and flat ones, float32 and
bfloat16, one sequence and the batched form; the log-add kernel, the fused path (raw logits), the
small-mass refinement, mode exact and the launch counts against the CPU's torch backend.
Tolerances as tests/unit/test_triton_conversion.py
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
from bld_scale.convert.backends import resolve_backend  # noqa: E402
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
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


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


# ---------------------------------------------------------------------- the log-add kernel, GPU vs CPU
def assert_rows_agree(gpu_out, cpu_out):
    """GPU triton vs CPU torch: the same float32 output rounding, exps that may differ by 1 ulp."""
    assert gpu_out.is_cuda and not cpu_out.is_cuda and gpu_out.shape == cpu_out.shape
    a, b = gpu_out.double().cpu(), cpu_out.double()
    assert float((a.exp() - b.exp()).abs().max()) <= P_TOLERANCE
    p = b.exp()
    big = p > 1e-12
    bound = 1e-6 + 2e-7 * b[big].abs() + 2e-9 / p[big]
    assert bool(((a[big] - b[big]).abs() <= bound).all())


def test_log_add_kernel_gpu_equals_cpu_edges(tekken_vocab, windows):
    """TritonSplits.add_to on the GPU (running sums + one program per output row) against the CPU's
    `split_edges` + `logaddexp_scatter` on the same splits: every split of a real window, log-added
    onto an output that already holds values; compared per output row, as probabilities relative to
    the row's largest cell (float32 exps to 1 ulp, float64 sums)."""
    from bld_scale.convert.backends import TritonSplits
    from bld_scale.convert.byte_rows import token_layout
    from bld_scale.convert.one_pass import one_pass_splits
    from bld_scale.convert.running_sums import logaddexp_scatter, split_edges

    ids = windows[0][:128]
    lp = logprobs([ids], tekken_vocab.vocab_size, peaked=True)[0]
    data, starts = token_layout(ids, tekken_vocab)
    k, end, node = one_pass_splits(data, starts, tekken_vocab)
    g = torch.Generator().manual_seed(0)
    weight = -torch.rand(len(ids) + 1, generator=g, dtype=torch.float64) * 20
    acc = torch.randn(len(data) + 1, 257, generator=g, dtype=torch.float64) - 30
    memory = lp.numel() * lp.element_size()
    got = acc.cuda()
    TritonSplits(lp, k, end, node, weight.cuda(), tekken_vocab.index, memory).add_to(got)
    ref = acc.clone()
    edges = split_edges(lp.cpu(), k, end, node, weight, tekken_vocab.index, memory)
    logaddexp_scatter(ref.view(-1), edges["target"], edges["value"])
    got = got.cpu()
    peak = ref.max(dim=1, keepdim=True).values
    assert float(((got - peak).exp() - (ref - peak).exp()).abs().max()) <= 1e-6


@pytest.mark.parametrize("mode", ["cover", "within_token"])
def test_gpu_triton_equals_cpu_torch(tekken_vocab, windows, mode):
    lp = logprobs(windows, tekken_vocab.vocab_size, peaked=True, seed=2)
    got, got_mask = byte_logprobs_batch(lp, windows, tekken_vocab, eos_id=2, mode=mode, backend="triton")
    ref, ref_mask = byte_logprobs_batch(lp.cpu(), windows, tekken_vocab, eos_id=2, mode=mode, backend="torch")
    assert torch.equal(got_mask.cpu(), ref_mask)
    assert_rows_agree(got, ref)


def test_gpu_fused_and_vanishing_masses_equal_cpu_torch(tekken_vocab, windows):
    """Raw logits (the GPU computes the normalisers) and a flat teacher over 151,936 rows, whose
    masses for the text vanish and are redone by the torch code on the GPU, against the CPU."""
    from bld_scale.convert.backends import log_normaliser_function

    short = [w[:64] for w in windows]
    flat = logprobs(short, tekken_vocab.vocab_size, peaked=False, seed=3) * 3.0  # valid logits, not normalised
    got, ref = (byte_logprobs_batch(x, short, tekken_vocab, eos_id=2, backend=backend,
                                    log_normaliser=log_normaliser_function(backend, x.device)(
                                        x.view(-1, x.shape[-1])).view(x.shape[:-1]))[0]
                for x, backend in ((flat, "triton"), (flat.cpu(), "torch")))
    assert_rows_agree(got, ref)


def test_gpu_exact_mode_triton_equals_cpu_torch(tekken_vocab, windows):
    """Mode exact through the kernels on the GPU (a tiny random Llama over Tekken's rows) against
    the torch backend on the GPU and on the CPU (the same model in float64 there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tekken_vocab.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).double().eval()
    ids = windows[0][:48]
    bos = 1
    cpu = byte_logprobs(None, ids, tekken_vocab, eos_id=2, mode="exact", teacher=model, bos_id=bos, backend="torch")
    model = model.cuda()
    got = byte_logprobs(None, ids, tekken_vocab, eos_id=2, mode="exact", teacher=model, bos_id=bos, backend="triton")
    ref = byte_logprobs(None, ids, tekken_vocab, eos_id=2, mode="exact", teacher=model, bos_id=bos, backend="torch")
    assert_backends_agree(got, ref)
    assert_rows_agree(got, cpu)


def test_gpu_launches_per_call(tekken_vocab, windows):
    """The triton path: two kernel launches per chunk of teacher rows and a few dozen torch
    operators per batched call; the torch path: ~15 operators per chunk (tools/bench_byteconv.py
    --count-only prints them)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        from bench_byteconv import count_launches
    finally:
        sys.path.pop(0)
    lp = logprobs(windows, tekken_vocab.vocab_size, peaked=True, seed=4)
    _, tri = count_launches(lambda: byte_logprobs_batch(lp, windows, tekken_vocab, eos_id=2, backend="triton"))
    _, ref = count_launches(lambda: byte_logprobs_batch(lp, windows, tekken_vocab, eos_id=2, backend="torch"))
    print(f"triton: {tri['torch_ops']} torch ops + {tri['triton_launches']} launches; torch: {ref['torch_ops']} ops")
    assert tri["triton_launches"] % 2 == 0 and tri["torch_ops"] < 80 and tri["torch_ops"] < ref["torch_ops"]
