"""`sequence_parallel_step` on two gloo ranks against `distill_step` on the whole batch.

The demo's tokenizers (teacher byte-level BPE, student SentencePiece) on 512-byte windows, tiny
random models. Ulysses is replaced by its result: each rank runs the models over the whole padded
sequence and keeps its own positions (what Ulysses attention gives, checked on gloo in
`bld_scale.parallel.sequence`'s integration run), so this checks the step's own logic: padding to
a multiple of the group, the teacher and student slices (which straddle each other's splits), the
byte rows each slot reads, and the loss reduced over the group, values and gradients.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

from bld_scale.config import DistillConfig

K = 6


def _setup():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bld_scale.data.batch import PairTokenizer, collate, split_windows
    from bld_scale.data.corpus import load_works
    from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR
    from bld_scale.model.student import build_student
    from bld_scale.tokenize.token_bytes import TokenBytes

    t_tok, s_tok = AutoTokenizer.from_pretrained(TEACHER_DIR), AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    t_vocab, s_vocab = TokenBytes.from_tokenizer(t_tok), TokenBytes.from_tokenizer(s_tok)
    text = next(iter(load_works("train").values()))[5000:8000]
    windows = split_windows(text, 512)[:1] + [split_windows(text, 200)[0]]  # a short one: padding
    batch = collate([PairTokenizer(t_vocab, s_vocab)(w) for w in windows], K=K,
                    teacher_bos=t_tok.bos_token_id, student_bos=s_tok.bos_token_id)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=t_vocab.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           initializer_range=0.2)).eval()
    torch.manual_seed(1)
    student = build_student(dict(model_type="llama", vocab_size=len(s_tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
                            head_kind="causal", K=K)
    return teacher, student, batch, t_vocab, t_tok.eos_token_id


def _sliced(full_forward):
    """A forward that, given a rank's positions, returns the whole sequence's outputs there."""
    def forward(position_ids, **inputs):
        lo, hi = int(position_ids[0, 0]), int(position_ids[0, -1]) + 1
        out = full_forward(hi)
        return tuple(o[:, lo:hi] for o in out) if isinstance(out, tuple) else out[:, lo:hi]
    return forward


def _rank(rank, port, results):
    import torch.distributed as dist

    from bld_scale.convert.sequence_parallel import SequenceGroup
    from bld_scale.train.sequence_step import _pad_to, sequence_parallel_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        teacher, student, batch, t_vocab, eos = _setup()
        t_len = -(-batch.teacher_input_ids.shape[1] // 2) * 2
        s_len = -(-batch.student_input_ids.shape[1] // 2) * 2
        t_ids = _pad_to(batch.teacher_input_ids, t_len, int(batch.teacher_input_ids[0, 0]))
        s_ids = _pad_to(batch.student_input_ids, s_len, int(batch.student_input_ids[0, 0]))
        prev = _pad_to(batch.byte_targets, s_len, -100)
        teacher_at = _sliced(lambda n: teacher(input_ids=t_ids[:, :n]).logits)
        student_at = _sliced(lambda n: student(input_ids=s_ids[:, :n], prev_bytes=prev[:, :n]))

        def group_sum(values):
            dist.all_reduce(values)
            return values

        for conversion in ("cover", "exact"):
            student.zero_grad()
            loss, logs = sequence_parallel_step(
                lambda ids, mask, pos: teacher_at(pos), lambda **kw: student_at(kw["position_ids"]), batch,
                DistillConfig(conversion=conversion, exact_chunk_tokens=4096), SequenceGroup(rank, 2), group_sum,
                teacher_vocab=t_vocab, teacher_eos_id=eos, teacher_model=teacher, agree_forwards=lambda n: n)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
            dist.all_reduce(grads)
            results[(conversion, rank)] = ({k: float(v) for k, v in logs.items()}, grads / 2)
        if rank == 0:  # the reference: the whole batch, one process
            results["reference"] = _reference(teacher, student, batch, t_vocab, eos)
    finally:
        dist.destroy_process_group()


def _reference(teacher, student, batch, t_vocab, eos) -> dict:
    from bld_scale.convert.shard_plan import even_bounds
    from bld_scale.train.step import distill_step

    out = {}
    for conversion in ("cover", "exact"):
        student.zero_grad()
        ref, logs = distill_step(lambda ids, mask: teacher(input_ids=ids, attention_mask=mask).logits, student,
                                 batch, DistillConfig(conversion=conversion, exact_chunk_tokens=4096),
                                 teacher_vocab=t_vocab, teacher_eos_id=eos, teacher_model=teacher)
        ref.backward()
        out[conversion] = ({k: float(v) for k, v in logs.items()},
                           torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    # where the halves start, in bytes of the first window: teacher and student splits differ
    t_split = even_bounds(-(-batch.teacher_input_ids.shape[1] // 2) * 2, 2)[1]
    s_split = even_bounds(-(-batch.student_input_ids.shape[1] // 2) * 2, 2)[1]
    out["splits"] = (int(batch.teacher_starts[0, t_split]), int(batch.student_starts[0, s_split]))
    return out


def test_two_ranks_give_the_loss_and_gradient_of_the_whole_batch():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2)
        results = dict(results)
    reference = results["reference"]
    t_byte, s_byte = reference["splits"]
    assert t_byte != s_byte  # the ranks' teacher and student slices cover different bytes
    for conversion in ("cover", "exact"):
        ref_logs, ref_grads = reference[conversion]
        for rank in range(2):
            logs, grads = results[(conversion, rank)]
            for key in ("loss", "loss_ce", "loss_byte_ce", "loss_kl"):
                assert logs[key] == pytest.approx(ref_logs[key], rel=1e-5), (conversion, key)
            assert torch.allclose(grads, ref_grads, rtol=1e-4, atol=1e-7), conversion
        assert results[(conversion, 0)][0]["tokens"] + results[(conversion, 1)][0]["tokens"] == ref_logs["tokens"]
        assert results[(conversion, 0)][0]["bytes"] + results[(conversion, 1)][0]["bytes"] == ref_logs["bytes"]
