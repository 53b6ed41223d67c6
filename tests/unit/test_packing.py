"""Packed windows (`bld_scale.data.packing`): one row, no padding, the padded batch's numbers.

References are the padded batches of `collate` (today's path, itself tested against hand
computations in test_data_step.py / test_evaluate.py) and each window run alone.

Tolerance of packed vs padded (fp32 on CPU): both layouts compute every window from exactly the
same inputs and weights; the masked keys of either layout get exactly zero attention weight. Only
the order of float sums differs (attention over T packed keys vs L_max padded ones, matmuls of
other shapes, a gradient accumulated over S packed rows vs B * J_max padded ones): a few ulps
(fp32: 6e-8 relative) per reduction, compounded through two layers and back. Measured: losses
agree to the last bit or ~1e-7 relative, logits and gradients to <= 6e-7 of the tensor's largest
entry. We allow 1e-5 relative, and 1e-5 of the tensor's largest entry absolute (`close`): a layout
bug (a window reading another, a row or target shifted by one) moves these numbers by 1e-3 or
more of their scale.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bld_scale.config import DistillConfig
from bld_scale.data.batch import PairTokenizer, collate, split_windows
from bld_scale.data.packing import pack, require_packed_attention
from bld_scale.evaluate import student_nll_sums, teacher_nll_sums
from bld_scale.model.student import build_student
from bld_scale.tokenize.token_bytes import TokenBytes
from bld_scale.train.step import distill_step, uld_pairs

RTOL = 1e-5  # see the module docstring


def close(actual: torch.Tensor, expected: torch.Tensor, msg=None) -> None:
    """Equal up to float rounding: 1e-5 relative, or 1e-5 of the largest entry of `expected`."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale + 1e-30, msg=msg)

K = 6


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        initializer_range=0.2)).eval()


def tiny_student(vocab_size: int, attn: str = "sdpa", head: str = "causal"):
    torch.manual_seed(1)
    return build_student(dict(model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              initializer_range=0.2), head_kind=head, K=K, attn_implementation=attn)


def forward_of(model):
    """A `TeacherForward` as the pipeline's: packed rows go in with position ids and no cache."""
    def forward(ids, mask, position_ids=None):
        if position_ids is None:
            return model(input_ids=ids, attention_mask=mask).logits
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    return forward


def windows_of(text: str) -> list[str]:
    """Windows of very different lengths, one of a single byte, one with multi-byte characters."""
    pieces = split_windows(text, 240)
    return [pieces[0], "x", pieces[1][:41], "é, 😀 — 日本語 ok", pieces[2]]


class Side:
    """A teacher, the tokenizer pair, and the BOS ids of both sides."""

    def __init__(self, kind, teacher, t_vocab, s_vocab, t_bos, s_bos, t_eos=None):
        self.kind, self.teacher, self.t_vocab, self.s_vocab = kind, teacher, t_vocab, s_vocab
        self.t_bos, self.s_bos, self.t_eos = t_bos, s_bos, t_eos

    def layouts(self, windows, same_tokenizer=False):
        pair = PairTokenizer(self.t_vocab, self.t_vocab if same_tokenizer else self.s_vocab)
        examples = [pair(w) for w in windows]
        s_bos = self.t_bos if same_tokenizer else self.s_bos
        return collate(examples, K, self.t_bos, s_bos), pack(examples, K, self.t_bos, s_bos)


@pytest.fixture(scope="module")
def texts():
    from bld_scale.data.corpus import load_works

    return [w[:40000] for w in list(load_works("train").values())[:3]]


@pytest.fixture(scope="module", params=["bpe_teacher", "sentencepiece_teacher"])
def side(request, texts):
    """Byte-level BPE teacher (rows = offsets) and a dummy-prefix SentencePiece one (rows = offsets + 1)."""
    from bld_scale.tokenize.zoo import train_byte_level_bpe, train_sentencepiece

    bpe, sp = train_byte_level_bpe(texts, vocab_size=400), train_sentencepiece(texts, vocab_size=400)
    bpe_vocab, sp_vocab = TokenBytes.from_tokenizer(bpe), TokenBytes.from_tokenizer(sp)
    if request.param == "bpe_teacher":
        return Side(request.param, tiny_llama(bpe_vocab.vocab_size), bpe_vocab, sp_vocab, bpe.eos_token_id,
                    sp.bos_id())
    return Side(request.param, tiny_llama(sp_vocab.vocab_size), sp_vocab, bpe_vocab, sp.bos_id(), bpe.eos_token_id)


@pytest.fixture(scope="module")
def demo_side():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bld_scale.demo import STUDENT_TOKENIZER_DIR, demo_teacher_path

    teacher = AutoModelForCausalLM.from_pretrained(demo_teacher_path(), dtype=torch.float32).eval()
    t_tok, s_tok = AutoTokenizer.from_pretrained(demo_teacher_path()), AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    return Side("demo", teacher, TokenBytes.from_tokenizer(t_tok, vocab_size=teacher.config.vocab_size),
                TokenBytes.from_tokenizer(s_tok), t_tok.bos_token_id, s_tok.bos_token_id, t_tok.eos_token_id)


# ---------------------------------------------------------------------- the layout
def test_windows_lie_end_to_end_with_positions_restarting(side, texts):
    windows = windows_of(texts[1])
    padded, packed = side.layouts(windows)
    lay = packed.packing
    assert packed.teacher_attention_mask is None and packed.student_attention_mask is None
    assert packed.teacher_input_ids.shape[0] == packed.student_input_ids.shape[0] == 1
    assert packed.teacher_input_ids.shape[1] == sum(len(t) + 1 for t in padded.teacher_ids)  # no padding
    assert packed.student_input_ids.shape[1] == int(padded.student_attention_mask.sum())
    teacher_rows = packed.teacher_rows[0]
    for b, window in enumerate(windows):
        t0, t1 = lay.teacher_bounds[b], lay.teacher_bounds[b + 1]
        s0, s1 = lay.student_bounds[b], lay.student_bounds[b + 1]
        L1, J = t1 - t0, s1 - s0
        assert torch.equal(lay.teacher_position_ids[0, t0:t1], torch.arange(L1))  # restart at each BOS
        assert torch.equal(lay.student_position_ids[0, s0:s1], torch.arange(J))
        assert packed.teacher_input_ids[0, t0] == side.t_bos and packed.student_input_ids[0, s0] == side.s_bos
        assert torch.equal(packed.teacher_input_ids[0, t0:t1], padded.teacher_input_ids[b, :L1])
        assert torch.equal(packed.teacher_starts[0, t0:t1], padded.teacher_starts[b, :L1])
        for name in ("student_input_ids", "student_labels", "student_starts", "byte_targets", "byte_offsets"):
            assert torch.equal(getattr(packed, name)[0, s0:s1], getattr(padded, name)[b, :J]), name
        assert int(padded.student_attention_mask[b].sum()) == J
        # the window's byte rows sit at its base in the packed conversion, and nowhere else
        data = b"".join(side.t_vocab.token_bytes(i) for i in padded.teacher_ids[b])
        r0, r1 = lay.byte_row_bounds[b], lay.byte_row_bounds[b + 1]
        assert r1 - r0 == len(data) + 1 == len(window.encode()) + int(padded.teacher_shift[b]) + 1
        valid = packed.byte_offsets[0, s0:s1] >= 0
        assert torch.equal(teacher_rows[s0:s1][valid], padded.teacher_rows[b, :J][valid] + r0)
        assert torch.equal(teacher_rows[s0:s1][~valid], torch.full_like(teacher_rows[s0:s1][~valid], -1))
    # both kinds of teacher rows are covered: rows = offsets, and rows = offsets + 1 (dummy prefix)
    assert {int(s) for s in padded.teacher_shift} == ({1} if side.kind == "sentencepiece_teacher" else {0})


def test_moving_a_packed_batch_moves_its_layout(side, texts):
    _, packed = side.layouts(windows_of(texts[1]))
    moved = packed.to("meta")
    assert moved.packing.teacher_position_ids.device.type == "meta"
    assert moved.packing.student_window.device.type == "meta"
    assert moved.packing.byte_row_base.device.type == "meta"
    assert moved.packing.teacher_bounds == packed.packing.teacher_bounds


def test_uld_pairs_stay_inside_each_window(side, texts):
    padded, packed = side.layouts(windows_of(texts[1]))
    s_pad, t_pad = uld_pairs(padded)
    s_pack, t_pack = uld_pairs(packed)
    assert s_pack.numel() == s_pad.numel() > 0
    window = packed.packing.student_window[0]
    t_window = torch.bucketize(t_pack, torch.tensor(packed.packing.teacher_bounds[1:]), right=True)
    assert torch.equal(window[s_pack], t_window)  # both ends of every pair in one window
    assert torch.equal(packed.student_starts.flatten()[s_pack], packed.teacher_starts.flatten()[t_pack])
    assert torch.equal(packed.student_starts.flatten()[s_pack], padded.student_starts.flatten()[s_pad])


def test_an_old_transformers_is_refused(monkeypatch):
    from transformers import masking_utils

    monkeypatch.delattr(masking_utils, "find_packed_sequence_indices")
    require_packed_attention.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="data.pack=true needs a transformers .* set data.pack=false"):
            require_packed_attention()
    finally:
        require_packed_attention.cache_clear()


# ---------------------------------------------------------------------- attention stays inside
def _perturbed_first_window(ids: torch.Tensor, bounds: list[int], vocab_size: int) -> torch.Tensor:
    out = ids.clone()
    out[0, bounds[0] + 1:bounds[1]] = (out[0, bounds[0] + 1:bounds[1]] + 7) % vocab_size  # BOS kept
    assert not torch.equal(out, ids)
    return out


def _check_isolation(call, ids, positions, bounds, vocab_size):
    """Perturbing window 0 changes its logits only; with one plain causal row it would leak."""
    perturbed = _perturbed_first_window(ids, bounds, vocab_size)
    with torch.no_grad():
        before, after = call(ids, positions), call(perturbed, positions)
        plain = torch.arange(ids.shape[1]).view(1, -1)  # no restart: one causal sequence
        leak_before, leak_after = call(ids, plain), call(perturbed, plain)
    first, rest = slice(bounds[0], bounds[1]), slice(bounds[1], None)
    assert (before[0, first] - after[0, first]).abs().max() > 1e-3  # the perturbation matters
    close(after[0, rest], before[0, rest])
    assert (leak_before[0, rest] - leak_after[0, rest]).abs().max() > 1e-3  # the test would see a leak
    return before


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_window_never_sees_another_in_the_student(side, texts, attn):
    padded, packed = side.layouts(windows_of(texts[2]))
    student = tiny_student(side.s_vocab.vocab_size, attn=attn).eval()
    lay = packed.packing

    def call(ids, positions):
        return student(input_ids=ids, attention_mask=None, position_ids=positions,
                       prev_bytes=packed.byte_targets)[0]

    _check_isolation(call, packed.student_input_ids, lay.student_position_ids, lay.student_bounds,
                     side.s_vocab.vocab_size)
    with torch.no_grad():  # and each window's outputs are its outputs alone
        logits, byte_logits = student(**packed.student_inputs(), prev_bytes=packed.byte_targets)
        for b in range(len(padded.teacher_ids)):
            s0, s1 = lay.student_bounds[b], lay.student_bounds[b + 1]
            alone, alone_bytes = student(input_ids=padded.student_input_ids[b:b + 1, : s1 - s0],
                                         prev_bytes=padded.byte_targets[b:b + 1, : s1 - s0])
            close(logits[0, s0:s1], alone[0])
            close(byte_logits[0, s0:s1], alone_bytes[0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_window_never_sees_another_in_the_teacher(side, texts, attn):
    side.teacher.set_attn_implementation(attn)
    try:
        padded, packed = side.layouts(windows_of(texts[2]))
        lay, forward = packed.packing, forward_of(side.teacher)
        logits = _check_isolation(lambda ids, pos: forward(ids, None, pos), packed.teacher_input_ids,
                                  lay.teacher_position_ids, lay.teacher_bounds, side.t_vocab.vocab_size)
        with torch.no_grad():
            for b, ids in enumerate(padded.teacher_ids):
                t0, t1 = lay.teacher_bounds[b], lay.teacher_bounds[b + 1]
                alone = side.teacher(input_ids=padded.teacher_input_ids[b:b + 1, : t1 - t0]).logits
                close(logits[0, t0:t1], alone[0])
    finally:
        side.teacher.set_attn_implementation("sdpa")


def test_the_demo_teacher_keeps_windows_apart(demo_side, texts):
    _, packed = demo_side.layouts(windows_of(texts[0]))
    lay, forward = packed.packing, forward_of(demo_side.teacher)
    _check_isolation(lambda ids, pos: forward(ids, None, pos), packed.teacher_input_ids, lay.teacher_position_ids,
                     lay.teacher_bounds, demo_side.t_vocab.vocab_size)


# ---------------------------------------------------------------------- same losses, same gradients
def _step(side, batch, cfg, student_vocab_size, head="causal"):
    student = tiny_student(student_vocab_size, head=head)
    loss, logs = distill_step(forward_of(side.teacher), student, batch, cfg, teacher_vocab=side.t_vocab,
                              teacher_model=side.teacher)
    loss.backward()
    return logs, {name: p.grad for name, p in student.named_parameters()}


def _assert_same_step(side, padded, packed, cfg, student_vocab_size, head="causal"):
    logs_pad, grads_pad = _step(side, padded, cfg, student_vocab_size, head)
    logs_pack, grads_pack = _step(side, packed, cfg, student_vocab_size, head)
    assert set(logs_pack) == set(logs_pad)
    for key in logs_pad:  # every term: loss, loss_ce and the method's own
        close(torch.as_tensor(logs_pack[key]), torch.as_tensor(logs_pad[key]), msg=key)
    assert all(grads_pad[name] is not None for name in grads_pad if "lm." in name)
    for name, g in grads_pad.items():
        if g is None:
            assert grads_pack[name] is None, name
            continue
        close(grads_pack[name], g, msg=name)
    return logs_pad


@pytest.mark.parametrize("method, conversion", [("ce", "cover"), ("uld", "cover"), ("bld", "cover"),
                                                ("bld", "within_token"), ("bld", "exact")])
def test_packed_and_padded_give_the_same_losses_and_gradients(side, texts, method, conversion):
    padded, packed = side.layouts(windows_of(texts[0]))
    logs = _assert_same_step(side, padded, packed, DistillConfig(method=method, conversion=conversion),
                             side.s_vocab.vocab_size)
    expected = {"ce": {"loss_ce"}, "uld": {"loss_ce", "loss_uld"},
                "bld": {"loss_ce", "loss_byte_ce", "loss_kl"}}[method]
    assert expected <= set(logs) and all(float(logs[k]) > 0 for k in expected)


def test_token_kd_packed_matches_padded(side, texts):
    padded, packed = side.layouts(windows_of(texts[0]), same_tokenizer=True)
    logs = _assert_same_step(side, padded, packed, DistillConfig(method="token_kd"), side.t_vocab.vocab_size,
                             head="linear")
    assert float(logs["loss_kd"]) > 0


@pytest.mark.parametrize("method, conversion", [("bld", "cover"), ("uld", "cover"), ("ce", "cover")])
def test_the_demo_teacher_gives_the_same_losses_packed(demo_side, texts, method, conversion):
    padded, packed = demo_side.layouts(windows_of(texts[0]))
    _assert_same_step(demo_side, padded, packed, DistillConfig(method=method, conversion=conversion),
                      demo_side.s_vocab.vocab_size)


@pytest.mark.parametrize("conversion", ["cover", "exact"])
def test_evaluation_sums_agree(demo_side, texts, conversion):
    padded, packed = demo_side.layouts(windows_of(texts[2]))
    kwargs = dict(conversion=conversion, teacher_model=demo_side.teacher, eos_id=demo_side.t_eos)
    want = teacher_nll_sums(forward_of(demo_side.teacher), padded, demo_side.t_vocab, **kwargs)
    got = teacher_nll_sums(forward_of(demo_side.teacher), packed, demo_side.t_vocab, **kwargs)
    assert got.n_bytes == want.n_bytes
    assert got.token_nll == pytest.approx(want.token_nll, rel=RTOL)
    assert got.byte_nll == pytest.approx(want.byte_nll, rel=RTOL)
    student = tiny_student(demo_side.s_vocab.vocab_size)
    (nll_pad, bytes_pad), (nll_pack, bytes_pack) = student_nll_sums(student, padded), student_nll_sums(student, packed)
    assert bytes_pack == bytes_pad and nll_pack == pytest.approx(nll_pad, rel=RTOL)


# ---------------------------------------------------------------------- the pipeline's batch path
def _pipeline_stub(side, pack_windows: bool):
    """What `Pipeline._batch` / `_teacher_forward` read from the run, without DeepSpeed."""
    from types import SimpleNamespace

    from bld_scale.train.pipeline import Pipeline
    from bld_scale.train.step_timer import StepTimer

    recipe = SimpleNamespace(data=SimpleNamespace(pack=pack_windows), student=SimpleNamespace(K=K))
    sides = SimpleNamespace(teacher_bos=side.t_bos, student_bos=side.s_bos)
    stub = SimpleNamespace(recipe=recipe, sides=sides, pair=PairTokenizer(side.t_vocab, side.s_vocab),
                           device=torch.device("cpu"), teacher=side.teacher, timer=StepTimer(torch.device("cpu")))
    stub._layout = lambda windows: Pipeline._layout(stub, windows)
    return stub


def test_the_pipeline_packs_when_the_recipe_says_so(demo_side, texts):
    """data.pack picks the layout, and the pipeline's teacher forward keeps packed windows apart
    (without use_cache=False the demo teacher, whose config caches, would read across windows)."""
    from bld_scale.train.pipeline import Pipeline

    windows = windows_of(texts[0])
    padded = Pipeline._batch(_pipeline_stub(demo_side, False), windows)
    stub = _pipeline_stub(demo_side, True)
    packed = Pipeline._batch(stub, windows)
    assert padded.packing is None and packed.packing is not None
    assert packed.teacher_input_ids.shape[0] == 1 and len(packed.teacher_ids) == len(windows)
    lay = packed.packing
    _check_isolation(lambda ids, pos: Pipeline._teacher_forward(stub, ids, None, pos), packed.teacher_input_ids,
                     lay.teacher_position_ids, lay.teacher_bounds, demo_side.t_vocab.vocab_size)
