"""Windows, batches and the engine-agnostic step: offsets line up, every method runs."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bld_scale.data.batch import PairTokenizer, collate, split_windows
from bld_scale.config import DistillConfig
from bld_scale.evaluate import student_nll_sums
from bld_scale.train.step import check_same_tokenizer, distill_step, uld_pairs
from bld_scale.model.student import build_student
from bld_scale.tokenize.zoo import mistral_sentencepiece, tekken
from bld_scale.tokenize.token_bytes import TokenBytes

HOSTILE = [
    "<|endoftext|> <s> [INST] plain text\r\n\tand  runs   of spaces  ",
    "  leading spaces, é, 😀, 👨‍👩‍👧, 日本語, e\u0301",
    "x",
]


@pytest.fixture(scope="module")
def sp_teacher_tiktoken_student():
    # A dummy-prefix SentencePiece teacher (shift 1) against a byte-level BPE student.
    return PairTokenizer(TokenBytes.from_tokenizer(mistral_sentencepiece()), TokenBytes.from_tokenizer(tekken()))


def test_split_windows_keeps_everything_and_characters_whole():
    text = ("To be, or not to be: that is the question. 日本語 😀\n" * 40)
    for size in (16, 64, 300):
        windows = split_windows(text, size)
        assert "".join(windows) == text
        assert all(0 < len(w.encode()) <= size for w in windows)


def test_offsets_line_up_on_hostile_texts(sp_teacher_tiktoken_student):
    pair = sp_teacher_tiktoken_student
    examples = [pair(t) for t in HOSTILE]
    K = 4
    batch = collate(examples, K=K, teacher_bos=1, student_bos=1)
    for b, ex in enumerate(examples):
        teacher_bytes = b"".join(pair.teacher.token_bytes(i) for i in ex.teacher_ids)
        assert ex.teacher_shift == 1  # the SentencePiece dummy prefix
        valid = batch.byte_offsets[b] >= 0
        offsets = batch.byte_offsets[b][valid].tolist()
        rows = batch.teacher_rows[b][valid].tolist()
        # each slot's true byte is the text's byte at its offset, and the teacher row at that
        # offset predicts that same byte
        assert batch.byte_targets[b][valid].tolist() == [ex.text_bytes[o] for o in offsets]
        assert [teacher_bytes[r] for r in rows] == [ex.text_bytes[o] for o in offsets]
        # slots follow the student's tokens: slot i of position j is byte a_j + i, for i < min(K, len)
        for j, (a, e) in enumerate(ex.student_spans):
            n = min(K, e - a)
            assert batch.byte_offsets[b, j, :n].tolist() == list(range(a, a + n))
            assert (batch.byte_offsets[b, j, n:] == -1).all()
        # every text byte is the first byte of exactly one student position's slot 0 or inside one
        assert sorted(set(batch.byte_offsets[b, :, 0][batch.byte_offsets[b, :, 0] >= 0].tolist())) == \
            sorted({a for a, e in ex.student_spans if e > a})


def test_uld_pairs_meet_at_the_same_byte_offset(sp_teacher_tiktoken_student):
    batch = collate([sp_teacher_tiktoken_student(t) for t in HOSTILE], K=2, teacher_bos=1, student_bos=1)
    s_idx, t_idx = uld_pairs(batch)
    assert s_idx.numel() > 0
    assert torch.equal(batch.student_starts.flatten()[s_idx], batch.teacher_starts.flatten()[t_idx])
    assert (batch.student_starts.flatten()[s_idx] >= 0).all()


def test_empty_window_is_refused(sp_teacher_tiktoken_student):
    with pytest.raises(ValueError, match="empty text"):
        sp_teacher_tiktoken_student("")


def test_token_kd_refuses_a_tokenizer_mismatch(sp_teacher_tiktoken_student):
    with pytest.raises(ValueError, match="share one tokenizer"):
        check_same_tokenizer(sp_teacher_tiktoken_student.teacher, sp_teacher_tiktoken_student.student)


# ---------------------------------------------------------------------- the step, end to end
@pytest.fixture(scope="module")
def tiny_pair():
    from bld_scale.data.corpus import load_works
    from bld_scale.tokenize.zoo import train_byte_level_bpe, train_sentencepiece

    texts = [w[:40000] for w in list(load_works("train").values())[:3]]
    t_tok = train_byte_level_bpe(texts, vocab_size=400)
    s_sp = train_sentencepiece(texts, vocab_size=400)
    t_vocab, s_vocab = TokenBytes.from_tokenizer(t_tok), TokenBytes.from_tokenizer(s_sp)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=t_vocab.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2)).eval()
    windows = split_windows(texts[0][:3000], 200)[:4]
    pair = PairTokenizer(t_vocab, s_vocab)
    batch = collate([pair(w) for w in windows], K=6, teacher_bos=t_tok.eos_token_id, student_bos=s_sp.bos_id())
    return teacher, t_vocab, s_vocab, batch


def _student(s_vocab, head="causal"):
    torch.manual_seed(1)
    return build_student(dict(model_type="llama", vocab_size=s_vocab.vocab_size, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2), head_kind=head, K=6)


def _teacher_fn(teacher):
    return lambda ids, mask: teacher(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["ce", "uld", "bld"])
def test_every_method_gives_a_finite_loss_and_gradients(tiny_pair, method):
    teacher, t_vocab, s_vocab, batch = tiny_pair
    student = _student(s_vocab)
    loss, logs = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method=method),
                              teacher_vocab=t_vocab)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in student.lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    expected = {"ce": {"loss_ce"}, "uld": {"loss_ce", "loss_uld"},
                "bld": {"loss_ce", "loss_byte_ce", "loss_kl"}}[method]
    assert expected <= set(logs)


def test_token_kd_runs_with_a_shared_tokenizer(tiny_pair):
    teacher, t_vocab, _, _ = tiny_pair
    pair = PairTokenizer(t_vocab, t_vocab)
    batch = collate([pair("to be or not to be"), pair("that is the question")], K=4,
                    teacher_bos=0, student_bos=0)
    check_same_tokenizer(t_vocab, t_vocab)
    student = _student(t_vocab, head="linear")
    loss, logs = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="token_kd"),
                              teacher_vocab=t_vocab)
    assert torch.isfinite(loss) and "loss_kd" in logs


def test_bld_kl_term_is_the_teacher_byte_targets(tiny_pair):
    """loss_kl equals forward KL computed here by hand from byte_logprobs for one slot set."""
    from bld_scale.convert import byte_logprobs

    teacher, t_vocab, s_vocab, batch = tiny_pair
    student = _student(s_vocab, head="linear")
    _, logs = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="bld"), teacher_vocab=t_vocab)
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=batch.teacher_input_ids,
                                       attention_mask=batch.teacher_attention_mask).logits.float(), -1)
        _, byte_logits = student(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask,
                                 prev_bytes=batch.byte_targets)
    total, count = 0.0, 0
    for b, ids in enumerate(batch.teacher_ids):
        q = byte_logprobs(lp[b, : len(ids) + 1], ids, t_vocab).double()
        rows = batch.teacher_rows[b]
        for j in range(rows.shape[0]):
            for i in range(rows.shape[1]):
                r = int(rows[j, i])
                if r < 0:
                    continue
                p_log = torch.log_softmax(byte_logits[b, j, i].double(), -1)
                qq = q[r].exp()
                total += float((qq * (q[r].clamp_min(-1e30) - p_log)).sum())
                count += 1
    assert float(logs["loss_kl"]) == pytest.approx(total / count, rel=1e-4)


def test_plain_loop_learns(tiny_pair):
    teacher, t_vocab, s_vocab, batch = tiny_pair
    student = _student(s_vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    before, n_bytes = student_nll_sums(student, batch)
    for _ in range(15):
        loss, _ = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="bld"), teacher_vocab=t_vocab)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = student_nll_sums(student, batch)
    assert after < before and n_bytes == int(batch.n_text_bytes.sum())


def test_bld_with_exact_targets_runs_one_tree_forward_per_text(tiny_pair):
    from bld_scale.convert.exact import exact_byte_targets

    teacher, t_vocab, s_vocab, batch = tiny_pair
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, **kw):
            calls.append(kw["input_ids"].shape)
            return self.inner(**kw)

    counted = Counting(teacher)
    q, mask = exact_byte_targets(counted, batch, t_vocab, None)
    assert len(calls) == len(batch.teacher_ids)
    # one forward carrying the canonical sequence and the tree gives the numbers of the
    # two-forward call (a plain forward, then the tree)
    from bld_scale.convert.exact import byte_logprobs_exact

    lp = torch.log_softmax(teacher(input_ids=batch.teacher_input_ids[:1, : len(batch.teacher_ids[0]) + 1]).logits[0].float(), -1)
    direct = byte_logprobs_exact(lp, batch.teacher_ids[0], t_vocab, teacher=teacher,
                                 bos_id=int(batch.teacher_input_ids[0, 0]))
    torch.testing.assert_close(q[0, : direct.shape[0]], direct, atol=1e-5, rtol=0)
    student = _student(s_vocab, head="linear")
    loss, logs = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="bld", conversion="exact"),
                              teacher_vocab=t_vocab, teacher_model=teacher)
    assert torch.isfinite(loss) and "loss_kl" in logs


def test_bld_from_given_byte_targets_needs_no_teacher(tiny_pair):
    """distill_step with `teacher_targets` (what a teacher cache serves) gives the online loss,
    without calling the teacher; other methods refuse byte targets."""
    from bld_scale.convert.dispatch import teacher_byte_targets

    teacher, t_vocab, s_vocab, batch = tiny_pair
    student = _student(s_vocab, head="linear")
    cfg = DistillConfig(method="bld")
    online, _ = distill_step(_teacher_fn(teacher), student, batch, cfg, teacher_vocab=t_vocab)
    q, mask, _ = teacher_byte_targets(batch, t_vocab, conversion="cover", teacher_forward=_teacher_fn(teacher))
    given, logs = distill_step(None, student, batch, cfg, teacher_targets=(q, mask))
    assert torch.equal(given, online) and logs["loss_kl"] > 0
    with pytest.raises(ValueError, match="only method 'bld'"):
        distill_step(None, student, batch, DistillConfig(method="uld"), teacher_targets=(q, mask))


@pytest.mark.parametrize("method", ["mined", "alm", "dskd"])
def test_each_baseline_trains_the_student_and_its_projectors(tiny_pair, method):
    """One step of each cross-tokenizer baseline: finite loss, gradients in the body (and in DSKD's
    projectors, which the optimizer sees and the state dict saves)."""
    from bld_scale.parallel.engines import param_groups

    teacher, t_vocab, s_vocab, batch = tiny_pair
    torch.manual_seed(1)
    student = build_student(dict(model_type="llama", vocab_size=s_vocab.vocab_size, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2), head_kind="linear", K=6,
                            teacher_hidden_size=32 if method == "dskd" else None)
    loss, logs = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method=method),
                              teacher_vocab=t_vocab, student_vocab=s_vocab, teacher_model=teacher)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.lm.parameters() if p.grad is not None)
    assert student.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    expected = {"mined": {"loss_mined"}, "alm": {"loss_alm"},
                "dskd": {"loss_kd_student", "loss_kd_teacher", "loss_ce_t2s", "t2s_accuracy"}}[method]
    assert expected | {"loss_ce"} <= set(logs)
    if method == "dskd":
        projector_params = list(student.projectors.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector_params)
        in_optimizer = {id(p) for group in param_groups(student, 0.1) for p in group["params"]}
        assert {id(p) for p in projector_params} <= in_optimizer
        assert any(k.startswith("projectors.") for k in student.state_dict())
    else:
        assert student.projectors is None


def test_baselines_refuse_packed_batches(tiny_pair):
    from bld_scale.data.packing import pack

    teacher, t_vocab, s_vocab, _ = tiny_pair
    pair = PairTokenizer(t_vocab, s_vocab)
    packed = pack([pair("to be or not to be"), pair("that is the question")], K=6, teacher_bos=0, student_bos=1)
    student = _student(s_vocab, head="linear")
    for method in ("mined", "alm", "dskd"):
        with pytest.raises(ValueError, match="data.pack: false"):
            distill_step(_teacher_fn(teacher), student, packed, DistillConfig(method=method),
                         teacher_vocab=t_vocab, student_vocab=s_vocab, teacher_model=teacher,
                         teacher_hidden=torch.zeros(1))


def test_a_shared_byte_targets_cache_gives_the_same_loss(tiny_pair):
    teacher, t_vocab, s_vocab, batch = tiny_pair
    student = _student(s_vocab, head="linear")
    plain, _ = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="bld"), teacher_vocab=t_vocab)
    cache: dict = {}
    first, _ = distill_step(_teacher_fn(teacher), student, batch, DistillConfig(method="bld"), teacher_vocab=t_vocab,
                            byte_targets_cache=cache)
    assert set(cache) == {"cover"}

    def no_teacher(ids, mask):
        raise AssertionError("the cached targets should have been used")

    second, _ = distill_step(no_teacher, student, batch, DistillConfig(method="bld"), teacher_vocab=t_vocab,
                             byte_targets_cache=cache)
    assert float(plain) == float(first) == float(second)


def test_dskd_with_a_replicated_teacher_gives_the_bare_models_loss(tiny_pair):
    """teacher.placement=replicate hands the step a `ReplicatedTeacher` (called like the ZeRO-3
    engine): dskd reads its embeddings and head through `.module`; the loss is the bare model's, bit
    for bit. (Mode exact's tree forwards through it: the launched sequence-parallel run.)"""
    from bld_scale.parallel.placement import ReplicatedTeacher

    teacher, t_vocab, s_vocab, batch = tiny_pair
    torch.manual_seed(1)
    student = build_student(dict(model_type="llama", vocab_size=s_vocab.vocab_size, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2), head_kind="linear", K=6,
                            teacher_hidden_size=32)
    cfg = DistillConfig(method="dskd")
    losses = [distill_step(_teacher_fn(model), student, batch, cfg, teacher_vocab=t_vocab, student_vocab=s_vocab,
                           teacher_model=model)[0] for model in (teacher, ReplicatedTeacher(teacher))]
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
