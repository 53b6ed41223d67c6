"""Conversion backend "triton" against the torch backend and the brute force, on the CPU.

The kernels (running sums, the edges' log-add into the byte rows, log-normalisers) against
independent float64 sums and against `split_edges` + `logaddexp_scatter`; whole conversions (cover,
within_token, fused from raw logits, exact, batched) against the torch backend and the brute
forces of tests/unit/test_byteconv.py and test_byteconv_exact.py, on table vocabularies, a local
BPE, Tekken (131k) and Mistral's SentencePiece (32k), hostile texts, masses down to 1e-15 (rows
redone by the torch code); and the launch counts per call.

The Triton kernels run here under the Triton interpreter (`TRITON_INTERPRET=1`, exact semantics,
slow): Triton reads that variable when a kernel is defined, so the module fixture sets it before
`bld_scale.convert.triton_sums` is first imported, and restores the environment afterwards.

Tolerances (the byte rows are float32; nothing tighter than float32 is comparable). Both
backends exponentiate in float32 (exps that may differ by 1 ulp, ~1.2e-7 relative, between
libraries) and sum in float64 in different orders. A range mass S(hi) - S(lo) contains only its
own tokens' exps, so it differs by <= ~2.4e-7 relative plus the float64 cancellation, which
`refine_small_masses` keeps below 1e-9 of each byte row's total (its documented tolerance; rows
made only of masses below that are re-summed directly by both). Hence probabilities to 2e-7
(float32 exps and output rounding), and log-probabilities where the probability exceeds 1e-12 to
1e-6 + 2e-7 |log p| + 2e-9 / p (float32 spacing of the value, plus each backend's 1e-9 of the
row). A cell below ~1e-16 of a distribution's mass may come out -inf from one backend and finite
from the other (both are within their absolute error there).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

# Triton decides whether to interpret when it defines a kernel, its own standard-library ones
# included (at `import triton`): import it under TRITON_INTERPRET=1, and leave the environment
# as it was for the rest of the session. In a session where triton was already imported without
# it (importing transformers does), this module's tests run in a child pytest instead
# (`test_module_under_the_interpreter`).
with pytest.MonkeyPatch.context() as _env:
    _env.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    import bld_scale.convert.triton_sums as triton_sums
INTERPRETED = isinstance(triton.language.standard.zeros, InterpretedFunction)

from bld_scale.convert import byte_logprobs, byte_logprobs_batch  # noqa: E402
from bld_scale.convert.backends import resolve_backend  # noqa: E402
from bld_scale.convert.dispatch import teacher_byte_targets  # noqa: E402
from bld_scale.convert.running_sums import RunningSums  # noqa: E402
from bld_scale.tokenize.token_bytes import TokenBytes  # noqa: E402
from test_byteconv import REAL_TEXT, SMALL, assert_matches, brute_force, random_logprobs  # noqa: E402
from vocab_tables import table_vocab  # noqa: E402

P_TOLERANCE = 2e-7


@pytest.mark.skipif(INTERPRETED, reason="this session interprets: the tests run here directly")
def test_module_under_the_interpreter(request):
    """This module in a fresh pytest under TRITON_INTERPRET=1, with this session's -m (~20 s)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
            "-k", "not test_module_under_the_interpreter"]
    if request.config.option.markexpr:
        args += ["-m", request.config.option.markexpr]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.fixture(autouse=True)
def interpreted_or_in_the_child(request):
    if not INTERPRETED and request.node.originalname != "test_module_under_the_interpreter":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this session: "
                    "test_module_under_the_interpreter runs this test in a child pytest")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The kernels' module, with TRITON_INTERPRET=1 set while this module's tests run (the backend
    refuses CPU tensors without it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield triton_sums


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 entries, so that a small vocabulary spans several scan blocks (carries)."""
    monkeypatch.setattr(triton_sums, "_SCAN_BLOCK", 64)
    monkeypatch.setattr(triton_sums, "_EDGE_BLOCK", 64)


def assert_backends_agree(triton_out, torch_out):
    assert triton_out.shape == torch_out.shape and triton_out.dtype == torch_out.dtype
    a, b = triton_out.double(), torch_out.double()
    assert float((a.exp() - b.exp()).abs().max()) <= P_TOLERANCE
    p = b.exp()
    big = p > 1e-12
    bound = 1e-6 + 2e-7 * b[big].abs() + 2e-9 / p[big]
    assert bool(((a[big] - b[big]).abs() <= bound).all())


def both(lp, ids, vocab, **kw):
    return (byte_logprobs(lp, ids, vocab, backend="triton", **kw),
            byte_logprobs(lp, ids, vocab, backend="torch", **kw))


# ---------------------------------------------------------------------- the kernels themselves
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_masses_match_float64_sums(interpreter, dtype):
    """Masses of random ranges against direct float64 sums (an independent reference)."""
    g = torch.Generator().manual_seed(0)
    rows, vocab_size, size = 5, 3000, 2990  # several scan blocks, a perm shorter than the row
    full = torch.log_softmax(torch.randn(rows, vocab_size + 7, generator=g) * 5, -1).to(dtype)
    lp = full[:, 3: vocab_size + 3]  # rows with a stride, not contiguous as a whole
    perm = torch.randperm(vocab_size, generator=g)[:size]
    sums = interpreter.TritonRunningSums(rows + 2, size, "cpu")  # more rows than loaded, as in chunks
    sums.load(lp, perm)
    lo = torch.randint(0, size, (400,), generator=g)
    hi = torch.minimum(lo + torch.randint(0, 300, (400,), generator=g), torch.tensor(size))
    row = torch.randint(0, rows, (400,), generator=g)
    got = sums.mass(row, lo, hi)
    p = lp.double().exp()[:, perm]
    ref = torch.stack([p[r, a:b].sum() for r, a, b in zip(row.tolist(), lo.tolist(), hi.tolist())])
    assert got.dtype == torch.float64
    assert bool(((got - ref).abs() <= 2.4e-7 * ref + 1e-15).all())  # float32 exp: <= 1 ulp each
    torch_sums = RunningSums(rows, size, "cpu")
    torch_sums.load(lp, perm)
    # both sum the same exps (to 1 ulp) in float64
    assert bool(((sums.sums[:rows] - torch_sums.sums).abs() <= 2.4e-7 * torch_sums.sums + 1e-15).all())
    assert torch.equal(sums.mass(row[:0], lo[:0], hi[:0]), torch.zeros(0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_normaliser_kernel_matches_logsumexp(interpreter, dtype, small_blocks):
    """One read per row (running max and float64 sum per lane) against float64 logsumexp, with
    rows spanning several blocks, a strided view, large offsets, and a row without mass."""
    g = torch.Generator().manual_seed(1)
    full = (torch.randn(6, 300 + 5, generator=g) * 4 + 400 * torch.rand(6, 1, generator=g)).to(dtype)
    full[2] = -float("inf")
    full[3, :150] = -float("inf")  # lanes that see only -inf in the first blocks
    logits = full[:, 2:302]
    got = interpreter.triton_log_normaliser(logits)
    ref = torch.logsumexp(logits.double(), -1)
    assert got.dtype == torch.float32 and got[2] == -float("inf")
    keep = torch.arange(6) != 2
    assert bool(((got[keep].double() - ref[keep]).abs() <= 1e-6 * ref[keep].abs().clamp_min(1)).all())


# ---------------------------------------------------------------------- backend choice
def test_backend_choice_and_refusals(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 1.0, 0)
    with pytest.raises(ValueError, match="unknown conversion backend 'cuda'"):
        byte_logprobs(lp, ids, vocab, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        byte_logprobs(lp, ids, vocab, backend="triton")
    byte_logprobs(lp, ids, vocab, backend="auto")  # the torch path: runs without the interpreter


def test_recipe_key_takes_the_three_backends():
    from bld_scale.config import DistillConfig

    assert DistillConfig().conversion_backend == "auto"  # triton on CUDA, torch elsewhere
    for name in ("auto", "torch", "triton"):
        assert DistillConfig(conversion_backend=name).conversion_backend == name


# ---------------------------------------------------------------------- conversions
@pytest.mark.parametrize("mode", ["cover", "within_token"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_small_vocab_triton_equals_torch_and_brute_force(mode, scale, small_blocks):
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the there here, they é😀 these")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, scale, seed=3)
    eos = vocab.vocab_size - 1
    got, ref = both(lp, ids, vocab, eos_id=eos, mode=mode)
    assert_backends_agree(got, ref)
    assert_matches(got, brute_force(lp, ids, vocab, eos_id=eos, mode=mode))


@pytest.mark.parametrize("tiny", [1e-8, 1e-15])
def test_vanishing_masses_are_refined_the_same_way(tiny, small_blocks):
    """The text's tokens and everything covering it get ~`tiny` of each row: whole byte rows are
    made of masses a difference of running sums cannot resolve, so both backends re-sum them."""
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("there these")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(ids) + 1, vocab.vocab_size, generator=g)
    data = b"".join(vocab.token_bytes(i) for i in ids)
    for v in range(vocab.vocab_size):
        piece = vocab.token_bytes(v)
        if piece and piece[0] in data:  # any token that could continue the text
            logits[:, v] += float(np.log(tiny)) - 3.0 * float(torch.rand(1, generator=g))
    lp = torch.log_softmax(logits, -1)
    got, ref = both(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    assert_backends_agree(got, ref)
    assert_matches(got, brute_force(lp, ids, vocab, eos_id=vocab.vocab_size - 1))


def test_bfloat16_and_batched_forms(small_blocks):
    vocab = table_vocab(SMALL)
    texts = ["the there", "here they are, these", "é"]
    ids = [vocab.encode(t)[0] for t in texts]
    lp = random_logprobs(len(texts) * (max(map(len, ids)) + 1), vocab.vocab_size, 2.0, 1)
    lp = lp.view(len(texts), -1, vocab.vocab_size).bfloat16()
    got, got_mask = byte_logprobs_batch(lp, ids, vocab, eos_id=vocab.vocab_size - 1, backend="triton")
    ref, ref_mask = byte_logprobs_batch(lp, ids, vocab, eos_id=vocab.vocab_size - 1, backend="torch")
    assert torch.equal(got_mask, ref_mask)
    assert_backends_agree(got, ref)


def test_teacher_byte_targets_passes_the_backend_through():
    vocab = table_vocab(SMALL)
    texts = ["the there", "here they"]
    ids = [vocab.encode(t)[0] for t in texts]
    l_max = max(map(len, ids))
    logits = torch.randn(len(texts), l_max + 1, vocab.vocab_size, generator=torch.Generator().manual_seed(2))

    class Batch:
        teacher_ids = ids
        teacher_input_ids = torch.zeros(len(texts), l_max + 1, dtype=torch.long)
        teacher_attention_mask = torch.ones(len(texts), l_max + 1, dtype=torch.long)

    calls = []

    def forward(input_ids, attention_mask):
        calls.append(input_ids.shape)
        return logits

    got = teacher_byte_targets(Batch, vocab, conversion="cover", teacher_forward=forward, backend="triton")
    ref = teacher_byte_targets(Batch, vocab, conversion="cover", teacher_forward=forward, backend="torch")
    assert len(calls) == 2 and torch.equal(got.mask, ref.mask)
    assert_backends_agree(got.byte_logprobs, ref.byte_logprobs)
    with pytest.raises(ValueError, match="unknown conversion backend"):
        teacher_byte_targets(Batch, vocab, conversion="cover", teacher_forward=forward, backend="gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_raw_logits_triton_equals_torch_and_brute_force(dtype, small_blocks):
    """The fused path (raw logits; each backend computes the normalisers and subtracts them as it
    reads a row) on both backends, against the brute force of the float64 log-softmax."""
    from bld_scale.convert.dispatch import teacher_token_logits

    vocab = table_vocab(SMALL)
    texts = ["the there", "here they are, these é😀"]
    ids = [vocab.encode(t)[0] for t in texts]
    l_max = max(map(len, ids))
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, l_max + 1, vocab.vocab_size, generator=g) * 3
              + 200 * torch.rand(2, l_max + 1, 1, generator=g)).to(dtype)

    class Batch:
        teacher_ids = ids
        teacher_input_ids = torch.zeros(2, l_max + 1, dtype=torch.long)
        teacher_attention_mask = torch.ones(2, l_max + 1, dtype=torch.long)

    eos = vocab.vocab_size - 1
    got = teacher_byte_targets(Batch, vocab, conversion="cover", teacher_forward=lambda i, m: logits,
                               eos_id=eos, backend="triton")
    ref = teacher_byte_targets(Batch, vocab, conversion="cover", teacher_forward=lambda i, m: logits,
                               eos_id=eos, backend="torch")
    assert got.token_logprobs is None and torch.equal(got.mask, ref.mask)
    assert_backends_agree(got.byte_logprobs, ref.byte_logprobs)
    _, lse = teacher_token_logits(lambda i, m: logits, Batch, backend="triton")
    for b, seq in enumerate(ids):
        n = int(got.mask[b].sum())
        lp = torch.log_softmax(logits[b, : len(seq) + 1].double(), -1)
        assert_matches(got.byte_logprobs[b, :n], brute_force(lp, seq, vocab, eos_id=eos))
        assert bool(((lse[b].double() - torch.logsumexp(logits[b].double(), -1)).abs() < 1e-4).all())


# ---------------------------------------------------------------------- real vocabularies
def _check_real(tok, text, seed, modes=("cover", "within_token"), brute=True):
    vocab = TokenBytes.from_tokenizer(tok)
    ids, _ = vocab.encode(text)
    for scale in (1.0, 6.0):  # random, and peaked
        lp = random_logprobs(len(ids) + 1, vocab.vocab_size, scale, seed)
        for mode in modes:
            got, ref = both(lp, ids, vocab, mode=mode)
            assert_backends_agree(got, ref)
            if brute:
                assert_matches(got, brute_force(lp, ids, vocab, mode=mode))


def test_locally_trained_bpe_triton_equals_torch():
    from bld_scale.data.corpus import load_works
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    works = load_works("train")
    tok = train_byte_level_bpe([text[:30000] for text in list(works.values())[:4]], vocab_size=600)
    _check_real(tok, REAL_TEXT, seed=13)


@pytest.mark.slow
def test_mistral_sentencepiece_triton_equals_torch():
    pytest.importorskip("mistral_common")
    from bld_scale.tokenize.zoo import mistral_sentencepiece

    _check_real(mistral_sentencepiece(), "The theory: there, é 日本", seed=12, brute=False)


# ---------------------------------------------------------------------- the recipe key, end to end
def test_training_step_and_evaluation_read_the_backend():
    """distill.conversion_backend reaches the step's conversion, and teacher_nll_sums takes it:
    "triton" gives the torch losses and sums (to the conversion's float32 rounding), and a CPU call
    without the interpreter is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bld_scale.config import DistillConfig
    from bld_scale.data.batch import PairTokenizer, collate, split_windows
    from bld_scale.data.corpus import load_works
    from bld_scale.evaluate import teacher_nll_sums
    from bld_scale.model.student import build_student
    from bld_scale.tokenize.zoo import train_byte_level_bpe
    from bld_scale.train.step import distill_step

    texts = [w[:20000] for w in list(load_works("train").values())[:2]]
    vocab = TokenBytes.from_tokenizer(train_byte_level_bpe(texts, vocab_size=300))
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=vocab.vocab_size, **small)).eval()
    student = build_student(dict(model_type="llama", vocab_size=vocab.vocab_size, **small), head_kind="linear", K=4)
    pair = PairTokenizer(vocab, vocab)
    batch = collate([pair(w) for w in split_windows(texts[0][:600], 100)[:2]], K=4, teacher_bos=0, student_bos=0)

    def forward(ids, mask):
        return teacher(input_ids=ids, attention_mask=mask).logits

    logs = {}
    for backend in ("torch", "triton"):
        with torch.no_grad():
            _, logs[backend] = distill_step(forward, student, batch,
                                            DistillConfig(method="bld", conversion_backend=backend),
                                            teacher_vocab=vocab)
    assert float(logs["triton"]["loss_kl"]) == pytest.approx(float(logs["torch"]["loss_kl"]), rel=1e-5)
    sums = {backend: teacher_nll_sums(forward, batch, vocab, backend=backend) for backend in ("torch", "triton")}
    assert sums["triton"].byte_nll == pytest.approx(sums["torch"].byte_nll, rel=1e-6)
    assert sums["triton"].token_nll == sums["torch"].token_nll
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            distill_step(forward, student, batch, DistillConfig(method="bld", conversion_backend="triton"),
                         teacher_vocab=vocab)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            teacher_nll_sums(forward, batch, vocab, backend="triton")


# ---------------------------------------------------------------------- the log-add kernel
@pytest.fixture
def big_blocks(monkeypatch):
    """Scan blocks of 16,384 entries: a real vocabulary's row in a few blocks (carries still
    crossed), so that the interpreter runs it in milliseconds instead of a third of a second."""
    monkeypatch.setattr(triton_sums, "_SCAN_BLOCK", 1 << 14)


def _chunks_of(monkeypatch, rows: int):
    """Chunks of `rows` teacher rows in both backends (many chunks, even for a short text)."""
    import bld_scale.convert.backends as backends
    import bld_scale.convert.running_sums as running_sums

    def few(num_rows, *args, **kwargs):
        return max(1, min(num_rows, rows))

    monkeypatch.setattr(backends, "chunk_rows", few)
    monkeypatch.setattr(running_sums, "chunk_rows", few)


def test_log_add_kernel_equals_the_edges_and_their_scatter(interpreter, small_blocks, monkeypatch):
    """TritonSplits.add_to (chunk by chunk: running sums, then one program per output row) against
    `split_edges` on the same running sums + `logaddexp_scatter`: random splits (the root's 256+
    children, leaves without any, several teacher rows and chunks feeding one output row), an
    output already holding values (as mode exact's accumulator does), weights -inf and NaN (dropped,
    as the scatter drops non-finite values). Both are float64: equal to float64 rounding."""
    from bld_scale.convert.backends import TritonSplits
    from bld_scale.convert.running_sums import logaddexp_scatter, split_edges

    _chunks_of(monkeypatch, 3)
    vocab = table_vocab(SMALL)
    index = vocab.index
    g = torch.Generator().manual_seed(21)
    rows, n_out, n_splits = 10, 7, 60
    lp = random_logprobs(rows, vocab.vocab_size, 3.0, seed=4)
    k = torch.randint(0, rows, (n_splits,), generator=g).numpy()
    end = torch.randint(0, n_out - 1, (n_splits,), generator=g).numpy()  # the last row gets nothing
    node = torch.randint(0, index.num_nodes, (n_splits,), generator=g).numpy()
    node[:3] = 0  # the root: every byte
    assert (index.child_count[node] == 0).any() and index.child_count[0] >= 256
    weight = torch.randn(rows, generator=g, dtype=torch.float64) * 3
    weight[2], weight[5] = -float("inf"), float("nan")
    acc = torch.randn(n_out, 257, generator=g, dtype=torch.float64)
    acc[torch.rand(n_out, 257, generator=g) < 0.5] = -float("inf")
    memory = lp.numel() * lp.element_size()

    got = acc.clone()
    TritonSplits(lp, k, end, node, weight, index, memory).add_to(got)
    ref = acc.clone()
    edges = split_edges(lp, k, end, node, weight, index, memory, running_sums=triton_sums.TritonRunningSums)
    logaddexp_scatter(ref.view(-1), edges["target"], edges["value"])
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert bool(((got[finite] - ref[finite]).abs() <= 1e-13 * ref[finite].abs().clamp_min(1)).all())
    assert torch.equal(got[n_out - 1], acc[n_out - 1]) and torch.equal(got[:, 256], acc[:, 256])
    assert int((got != acc).sum()) > 100  # the kernel did add


def _teacher_rows(windows, vocab_size: int, peaked: bool, seed: int) -> torch.Tensor:
    """`[B, L_max + 1, V]` log-probabilities; peaked: each next token gets a large logit, as a
    trained teacher's would (tests/synthetic_logits.py's rows, empty windows allowed)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(windows), max(map(len, windows)) + 1, vocab_size, generator=g) * 2.0
    for b, ids in enumerate(windows if peaked else ()):
        boost = torch.randn(len(ids), generator=g) * 2.5 + 6.0
        logits[b, torch.arange(len(ids)), torch.as_tensor(ids, dtype=torch.long)] += boost
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("name", ["tekken", "mistral_sp"])
def test_hostile_texts_on_real_vocabularies(case_of, name, big_blocks, monkeypatch):
    """Tekken (131k) and Mistral's SentencePiece (32k, dummy prefix): an empty text, one byte, runs
    of one byte, token boundaries inside UTF-8 characters (byte tokens), CJK, emoji, control
    characters, all in one batched call (one pass over the batch), against the torch backend; two
    short ones against the brute force too. A teacher shaped like a trained one needs no
    re-summation; flat random rows over 10^5 tokens give the text vanishing masses, redone."""
    from bld_scale.convert.backends import TritonSplits

    pytest.importorskip("mistral_common")
    vocab = case_of(name).tb
    texts = ["", "a", "a" * 20 + "=" * 12, "𝔘𝔫 日本 é😀", "\n\t\x00 \u200b"]
    ids = [vocab.encode(t)[0] for t in texts]
    inside = [b for b, seq in enumerate(ids)
              if any(piece and (piece[0] & 0xC0) == 0x80 for piece in map(vocab.token_bytes, seq))]
    assert inside, "no token boundary inside a character: the text does not test what it says"
    redone = []
    real = TritonSplits.torch_edges
    monkeypatch.setattr(TritonSplits, "torch_edges", lambda self, rows: redone.append(rows) or real(self, rows))
    for peaked, mode in ((True, "cover"), (False, "within_token")):
        lp = _teacher_rows(ids, vocab.vocab_size, peaked, seed=9)
        redone.clear()
        got, got_mask = byte_logprobs_batch(lp, ids, vocab, eos_id=2, mode=mode, backend="triton")
        assert bool(redone) != peaked
        ref, ref_mask = byte_logprobs_batch(lp, ids, vocab, eos_id=2, mode=mode, backend="torch")
        assert torch.equal(got_mask, ref_mask)
        assert_backends_agree(got, ref)
    assert got_mask[0].sum() == 1 + (len(vocab.token_bytes(ids[0][0])) if ids[0] else 0)
    for b in (1, 3 if name == "mistral_sp" else 1):  # the brute force scans the vocabulary per prefix
        n = int(got_mask[b].sum())
        got_b = byte_logprobs(lp[b, : len(ids[b]) + 1], ids[b], vocab, eos_id=2, mode="within_token",
                              backend="triton")
        assert torch.equal(got_b, got[b, :n])  # batched = alone
        assert_matches(got_b, brute_force(lp[b, : len(ids[b]) + 1], ids[b], vocab, eos_id=2, mode="within_token"))


def test_refinement_redoes_only_the_flagged_rows(small_blocks, monkeypatch):
    """Vanishing masses on part of the text only: the rows they make are redone by the torch code
    (and only those), and the result is the torch backend's and the brute force's."""
    from bld_scale.convert.backends import TritonSplits

    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the there these")
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(len(ids) + 1, vocab.vocab_size, generator=g)
    logits[: 3] -= 40.0 * torch.tensor([vocab.token_bytes(v) is not None and vocab.token_bytes(v)[:1] in b"th e"
                                        for v in range(vocab.vocab_size)]).float()
    lp = torch.log_softmax(logits, -1)
    redone = []
    real = TritonSplits.torch_edges
    monkeypatch.setattr(TritonSplits, "torch_edges", lambda self, rows: redone.append(rows) or real(self, rows))
    got, ref = both(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    assert len(redone) == 1 and 0 < redone[0].size < got.shape[0] - 1
    assert_backends_agree(got, ref)
    assert_matches(got, brute_force(lp, ids, vocab, eos_id=vocab.vocab_size - 1))


# ---------------------------------------------------------------------- mode exact
def _exact_case(text, seed, scale=None):
    from test_byteconv_exact import SMALL as EXACT_SMALL
    from test_byteconv_exact import tiny_llama

    vocab = table_vocab(EXACT_SMALL)
    model = tiny_llama(vocab.vocab_size, seed=seed, init=1.0 if scale else 0.2)
    if scale:
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)  # logits over tens of nats: vanishing masses
    return vocab, model


def test_exact_mode_triton_equals_torch_and_brute_force(small_blocks):
    """One tree forward, and one branch per forward (the tree rows in several calls, each judged
    with the canonical rows' totals), against the torch backend; the brute force once."""
    from test_byteconv_exact import brute_force_exact, run_exact

    text = "the é😀h"
    vocab, model = _exact_case(text, seed=1)
    bos = eos = vocab.vocab_size - 1
    for max_tokens in (4096, 4):
        ids, _, got = run_exact(model, vocab, text, bos, eos, prefix_window=None, max_tokens=max_tokens,
                                backend="triton")
        _, _, ref = run_exact(model, vocab, text, bos, eos, prefix_window=None, max_tokens=max_tokens,
                              backend="torch")
        assert_backends_agree(got, ref)
    brute = brute_force_exact(model, vocab, ids, bos, eos, vocab._encode_ids, 0)
    assert np.abs(got.double().exp().numpy() - brute).max() <= 1e-5


def test_exact_mode_vanishing_masses_through_the_kernels(small_blocks, monkeypatch):
    """Mode exact's canonical rows and tree rows with masses below what running sums resolve: both
    are redone by the torch code after the kernels, and match the torch backend and the brute force."""
    from bld_scale.convert.backends import TritonSplits
    from test_byteconv_exact import brute_force_exact, run_exact

    vocab, model = _exact_case("there these", seed=11, scale=8.0)
    bos = eos = vocab.vocab_size - 1
    redone = []
    real = TritonSplits.torch_edges
    monkeypatch.setattr(TritonSplits, "torch_edges", lambda self, rows: redone.append(rows) or real(self, rows))
    ids, _, got = run_exact(model, vocab, "there these", bos, eos, prefix_window=None, max_tokens=6, backend="triton")
    assert redone
    _, _, ref = run_exact(model, vocab, "there these", bos, eos, prefix_window=None, max_tokens=6, backend="torch")
    assert_backends_agree(got, ref)
    brute = brute_force_exact(model, vocab, ids, bos, eos, vocab._encode_ids, 0)
    assert np.abs(got.double().exp().numpy() - brute).max() <= 1e-5


def test_exact_targets_of_a_batch_and_tekken_through_the_kernels(case_of, big_blocks):
    """`teacher_byte_targets(conversion="exact", backend=...)` reaches the kernels (a batch, table
    vocabulary), and Tekken's exact rows (boundaries inside tokens) equal the torch backend's."""
    from test_byteconv_exact import run_exact, tiny_llama

    pytest.importorskip("mistral_common")
    vocab = case_of("tekken").tb
    special = next(i for i in range(vocab.vocab_size) if vocab.token_bytes(i) is None)
    model = tiny_llama(vocab.vocab_size, seed=12)
    got = run_exact(model, vocab, "There's", special, special, prefix_window=16, backend="triton")[2]
    ref = run_exact(model, vocab, "There's", special, special, prefix_window=16, backend="torch")[2]
    assert_backends_agree(got, ref)

    small, model = _exact_case("", seed=3)
    texts = ["there the", "these é😀h"]
    ids = [small.encode(t)[0] for t in texts]
    l_max = max(map(len, ids))
    bos = small.vocab_size - 1

    class Batch:
        teacher_ids = ids
        teacher_input_ids = torch.full((2, l_max + 1), bos, dtype=torch.long)
        teacher_attention_mask = torch.ones(2, l_max + 1, dtype=torch.long)

    out = {backend: teacher_byte_targets(Batch, small, conversion="exact", teacher_forward=None, teacher_model=model,
                                         eos_id=bos, backend=backend) for backend in ("triton", "torch")}
    assert torch.equal(out["triton"].mask, out["torch"].mask)
    assert_backends_agree(out["triton"].byte_logprobs, out["torch"].byte_logprobs)


# ---------------------------------------------------------------------- launches
def test_launch_counts_do_not_grow_with_chunks_or_texts(small_blocks, monkeypatch):
    """The triton path makes two kernel launches per chunk of the teacher rows that feed a split
    (running sums, log-add; padding rows are skipped) and a fixed number of torch operators per
    call, however many chunks and texts; the torch path makes ~15 operators per chunk (the counter
    is checked on it). tools/bench_byteconv.py counts."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    from bench_byteconv import count_launches

    vocab = table_vocab(SMALL)
    texts = ["the there", "here they are, these", "é😀 these"]
    counts = {}
    for n_texts in (1, 3):
        ids = [vocab.encode(t)[0] for t in texts[:n_texts]]
        lp = random_logprobs(n_texts * (max(map(len, ids)) + 1), vocab.vocab_size, 2.0, 1)
        lp = lp.view(n_texts, -1, vocab.vocab_size)
        for chunk in (1000, 2):
            with pytest.MonkeyPatch.context() as mp:
                _chunks_of(mp, chunk)
                for backend in ("torch", "triton"):
                    counts[n_texts, chunk, backend] = count_launches(
                        lambda: byte_logprobs_batch(lp, ids, vocab, eos_id=vocab.vocab_size - 1, backend=backend))[1]
    for n_texts in (1, 3):
        rows = sum(len(vocab.encode(t)[0]) for t in texts[:n_texts])  # the rows that feed splits
        one, many = counts[n_texts, 1000, "triton"], counts[n_texts, 2, "triton"]
        assert one["kernels"] == {"_running_sums_kernel": 1, "_split_log_add_kernel": 1}
        assert many["triton_launches"] == 2 * -(-rows // 2) and one["torch_ops"] == many["torch_ops"]
        torch_one, torch_many = counts[n_texts, 1000, "torch"], counts[n_texts, 2, "torch"]
        assert torch_one["triton_launches"] == 0 and torch_many["torch_ops"] > torch_one["torch_ops"] + 10 * rows // 2
        assert one["torch_ops"] < torch_one["torch_ops"] / 2
    # per text only what pad_byte_rows copies (2 operators a text)
    assert counts[3, 2, "triton"]["torch_ops"] - counts[1, 2, "triton"]["torch_ops"] <= 2 * 2
