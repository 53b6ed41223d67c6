"""The offline teacher as users run it: `tools/cache_teacher.py`, then `launch/distill.py` with
`distill.teacher_cache`, real processes, the shipped teacher.

Tolerance: a float32 cache with k = 257 stores the rows the online run converts, from the same
teacher forward on the same windows (in batches of other shapes, so the logits may differ in
the last bits): the losses agree to ~1e-6 (measured 9.5e-7 at most on losses of ~13); 1e-5 leaves
room for that and none for a wrong row (a shift, another window: the KL term moves by >1e-2).
"""
from __future__ import annotations

import sys

import pytest
import torch

from launching import DISTILL, REPO, assert_same_steps, records, run_launch

TOOL = REPO / "tools" / "cache_teacher.py"
RUN = ["train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=2", "train.log_interval=1",
       "train.eval_interval=0", "train.warmup_steps=2", "checkpoint.interval=0", "logging.tensorboard=false"]
WINDOWS = 8  # 2 steps x 2 micro-batches x 2 windows


@pytest.fixture(scope="module")
def lossless_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    proc = run_launch([sys.executable, str(TOOL), "--config", str(REPO / "launch/recipes/demo.yaml"), "--out", str(out),
                       "--top-k", "257", "--dtype", "float32", "--max-windows", str(WINDOWS),
                       "--windows-per-shard", "4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{WINDOWS} windows in 2 shards (k=257, float32)" in proc.stdout
    return out


def test_a_run_from_a_lossless_cache_has_the_online_losses(lossless_cache, tmp_path):
    online, cached = tmp_path / "online", tmp_path / "cached"
    proc = run_launch([sys.executable, str(DISTILL), *RUN, f"output_dir={online}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_launch([sys.executable, str(DISTILL), *RUN, f"output_dir={cached}", f"distill.teacher_cache={lossless_cache}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the teacher is not loaded" in proc.stdout and not records(cached, "teacher_eval")
    assert_same_steps(online, cached, 2, abs=1e-5)


def test_a_run_past_the_cached_windows_is_refused_in_one_line(lossless_cache, tmp_path):
    proc = run_launch([sys.executable, str(DISTILL), *RUN, "train.max_steps=3", f"output_dir={tmp_path}",
                       f"distill.teacher_cache={lossless_cache}"])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [m for m in proc.stderr.splitlines() if m.startswith("bld_scale:")]
    assert line == [line[0]] and f"holds {WINDOWS} windows but this run takes 12" in line[0], proc.stderr[-2000:]


@pytest.fixture(scope="module")
def demo_teacher():
    from bld_scale.demo import load_demo_teacher

    return load_demo_teacher()


@pytest.mark.parametrize("tokenizer", ["student_tokenizer", "teacher"])  # SentencePiece, byte-level BPE
@pytest.mark.parametrize("pack", [False, True])
def test_one_cache_serves_students_of_two_tokenizers(lossless_cache, demo_teacher, tokenizer, pack):
    """The cached targets of each student head slot are the online conversion's, for a SentencePiece
    student (the demo's) and a byte-level BPE one (the teacher's own tokenizer), padded and packed."""
    from transformers import AutoTokenizer

    from bld_scale.cache.reader import TeacherCache
    from bld_scale.config import load_recipe
    from bld_scale.convert.dispatch import teacher_byte_targets
    from bld_scale.data.batch import PairTokenizer, collate, resolve_bos
    from bld_scale.data.packing import pack as pack_batch
    from bld_scale.data.sources import WindowStream, open_corpus
    from bld_scale.tokenize.token_bytes import TokenBytes
    from bld_scale.train.losses import gather_teacher_rows

    student_dir = REPO / "bld_scale" / "assets" / "demo" / tokenizer
    recipe = load_recipe(REPO / "launch/recipes/demo.yaml", [f"student.tokenizer={student_dir}"])
    model, t_tok = demo_teacher
    s_tok = AutoTokenizer.from_pretrained(student_dir)
    t_vocab = TokenBytes.from_tokenizer(t_tok, vocab_size=model.config.vocab_size)
    pair = PairTokenizer(t_vocab, TokenBytes.from_tokenizer(s_tok))
    windows = WindowStream(open_corpus(recipe.data, log=None).train, recipe.data.window_bytes, recipe.seed).take(WINDOWS)
    first, texts = 4, windows[4:7]
    batch = (pack_batch if pack else collate)([pair(w) for w in texts], 10, resolve_bos(t_tok)[0], resolve_bos(s_tok)[0])

    def forward(ids, mask, position_ids=None):
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits

    q, mask, _ = teacher_byte_targets(batch, t_vocab, conversion="cover", teacher_forward=forward,
                                      eos_id=t_tok.eos_token_id)
    cached = TeacherCache.open(lossless_cache, recipe, WINDOWS).targets(batch, texts, first)
    want, want_mask = gather_teacher_rows(q, batch.teacher_rows, mask)
    got, got_mask = gather_teacher_rows(*cached[:1], batch.teacher_rows, cached[1])
    assert torch.equal(got_mask, want_mask) and want_mask.sum() > 1000
    assert torch.allclose(got[got_mask], want[want_mask], atol=1e-5)
