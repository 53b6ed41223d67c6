"""The teacher cache (bld_scale.cache): the row codec against an independent reference, building
with resume after interruptions and damage, ranks splitting the shards, reading by window, and
every refusal. The teacher is replaced by synthetic rows (a function of the window's text), so
these run in seconds; tests/integration/test_offline_teacher.py runs the real teacher and pipeline.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.cache.layout import MANIFEST, shard_name, sidecar_name
from bld_scale.cache.reader import TeacherCache
from bld_scale.cache.rows import bytes_per_row, decode_rows, encode_rows
from bld_scale.cache.tail import BYTE_CLASS, CONTEXTS
from bld_scale.cache.writer import build_cache
from bld_scale.config import load_recipe
from bld_scale.data.sources import WindowStream, open_corpus

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "recipes" / "demo.yaml"
WINDOWS, PER_SHARD = 7, 3  # shards of 3, 3, 1 windows


def recipe(*overrides):
    return load_recipe(DEMO, ["data.window_bytes=256", "train.max_steps=1", "train.micro_batch_size=2", *overrides])


def synthetic_rows(texts):
    """Log-probabilities that depend on the text alone (seeded by its hash), some outcomes at zero mass."""
    out = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(len(text.encode()), 257, generator=g, dtype=torch.float64) * 3
        logits[:, 200:210] = -math.inf
        out.append(torch.log_softmax(logits, dim=1))
    return out


class Interrupt(RuntimeError):
    pass


def failing_after(calls):
    count = [0]

    def rows_of(texts):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt("killed")
        return synthetic_rows(texts)
    return rows_of


def build(folder, rows_of=synthetic_rows, r=None, **kw):
    # plain shards: the resume tests here read and damage shard files by their plain names
    args = dict(top_k=257, dtype="float32", max_windows=WINDOWS, windows_per_shard=PER_SHARD, batch_size=2,
                compress=False, log=lambda m: None)
    args.update(kw)
    return build_cache(r or recipe(), folder, rows_of, **args)


def stream_windows(r, n):
    return WindowStream(open_corpus(r.data, log=None).train, r.data.window_bytes, r.seed).take(n)


def test_full_rows_are_stored_losslessly_in_float32():
    q = synthetic_rows(["some text for rows"])[0]
    assert torch.equal(decode_rows(encode_rows(q, 257, "float32")), q.float())


def test_truncated_rows_keep_the_top_k_bytes_and_spread_the_rest_uniformly():
    q = synthetic_rows(["another text"])[0]
    k = 5
    got = decode_rows(encode_rows(q, k, "float32")).double().exp().numpy()
    p = q.exp().numpy()
    for row, want in zip(got, p):
        top = np.argsort(-want[:256], kind="stable")[:k]  # EOT (256) is never stored
        others = np.setdiff1d(np.arange(257), top)
        ref = np.empty(257)
        ref[top] = want[top]
        ref[others] = want[others].sum() / len(others)
        np.testing.assert_allclose(row, ref, rtol=1e-6, atol=1e-12)
        assert row.sum() == pytest.approx(1.0, abs=1e-6)  # float32 rows


def test_the_remaining_mass_follows_the_tail_profile():
    q = synthetic_rows(["a text with a tail"])[0]
    k = 6
    stored = encode_rows(q, k, "float32")
    profile = np.linspace(1.0, 3.0, 257)
    got = decode_rows(stored, torch.tensor(profile / profile.sum())).double().exp().numpy()
    for row, want in zip(got, q.exp().numpy()):
        top = np.argsort(-want[:256], kind="stable")[:k]
        others = np.setdiff1d(np.arange(257), top)
        ref = np.empty(257)
        ref[top] = want[top]
        ref[others] = want[others].sum() * profile[others] / profile[others].sum()
        np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-12)


def test_the_manifest_sums_the_mass_truncation_left_out(tmp_path):
    manifest = build(tmp_path / "c", top_k=4)
    texts = stream_windows(recipe(), WINDOWS)
    p = torch.cat(synthetic_rows(texts)).exp()
    top = torch.topk(p[:, :256], 4).indices
    left = p.scatter(1, top, 0.0)
    want = left.sum(0)
    np.testing.assert_allclose(manifest["tail_mass"], want.numpy(), rtol=1e-9)
    # per context, on the first shard's rows: the class of the byte before each row, a window's first
    # row in class 0
    previous = [None if i == 0 else t.encode()[i - 1] for t in texts[:PER_SHARD] for i in range(len(t.encode()))]
    by_context = torch.zeros(CONTEXTS, 257, dtype=torch.float64)
    for row, b in zip(left, previous):
        by_context[0 if b is None else int(BYTE_CLASS[b])] += row
    assert manifest["tail_context"] == "previous byte class"
    assert all("tail_mass" not in e and "tail_mass_by_context" not in e for e in manifest["shards"].values())
    np.testing.assert_allclose(manifest["tail_mass_by_context"], by_context.numpy(), rtol=1e-9, atol=1e-15)
    cache = TeacherCache.open(tmp_path / "c", recipe(), 1)
    overall = want / want.sum()
    smoothed = (by_context + overall) / (by_context.sum(1, keepdim=True) + 1.0)  # CONTEXT_SMOOTHING = 1
    assert torch.allclose(cache.prior, smoothed.clamp(min=1e-9))
    unseen = by_context.sum(1) == 0
    assert unseen.any() and torch.allclose(cache.prior[unseen], overall.clamp(min=1e-9).expand(int(unseen.sum()), -1))


def test_float16_rows_are_proper_distributions_near_the_originals():
    q = synthetic_rows(["half precision"])[0]
    got = decode_rows(encode_rows(q, 16, "float16"))
    assert torch.allclose(got.double().exp().sum(1), torch.ones(len(q), dtype=torch.float64), atol=1e-6)
    top = torch.topk(q[:, :256], 16).indices
    assert torch.allclose(got.gather(1, top).double(), q.gather(1, top), atol=2e-2)
    assert bytes_per_row(16, "float16") == 16 * 3 + 2 and bytes_per_row(257, "float32") == 257 * 4


def test_an_undefined_row_stays_undefined():
    q = torch.full((1, 257), -math.inf, dtype=torch.float64)
    assert torch.isinf(decode_rows(encode_rows(q, 4, "float16"))).all()


def test_the_cache_serves_each_window_of_the_stream_in_order(tmp_path):
    manifest = build(tmp_path / "c")
    assert manifest["complete"] and len(manifest["shards"]) == 3
    r = recipe()
    cache = TeacherCache.open(tmp_path / "c", r, windows_needed=WINDOWS)
    texts = stream_windows(r, WINDOWS)
    for i, (text, want) in enumerate(zip(texts, synthetic_rows(texts))):
        assert torch.equal(cache.window_rows(i, text), want.float())


def test_an_interrupted_build_resumes_without_rewriting_intact_shards(tmp_path):
    folder = tmp_path / "c"
    with pytest.raises(Interrupt):  # two forwards of 2 windows: shard 0 written, shard 1 half done
        build(folder, failing_after(2))
    assert json.loads((folder / MANIFEST).read_text())["complete"] is False
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache.open(folder, recipe(), 1)
    first = (folder / shard_name(0)).stat()
    build(folder)
    again = (folder / shard_name(0)).stat()
    assert (first.st_ino, first.st_mtime_ns) == (again.st_ino, again.st_mtime_ns)  # not written twice
    reference = tmp_path / "clean"
    build(reference)
    for s in range(3):
        assert (folder / shard_name(s)).read_bytes() == (reference / shard_name(s)).read_bytes()


def test_a_partial_or_damaged_shard_is_redone(tmp_path):
    folder = tmp_path / "c"
    with pytest.raises(Interrupt):  # shards 0 and 1 written (4 forwards), shard 2 not
        build(folder, failing_after(4))
    good = (folder / shard_name(1)).read_bytes()
    (folder / shard_name(1)).write_bytes(good[: len(good) // 2])  # truncated
    (folder / sidecar_name(0)).unlink()  # written, but its record never was
    (folder / (shard_name(2) + ".tmp")).write_bytes(b"half")  # a write cut short
    logs = []
    build(folder, log=logs.append)
    assert (folder / shard_name(1)).read_bytes() == good
    assert any("shard-000001.safetensors" in m and "truncated" in m for m in logs)
    TeacherCache.open(folder, recipe(), WINDOWS)


def test_ranks_split_the_shards(tmp_path):
    folder = tmp_path / "c"
    for rank in (1, 0):  # rank 0 lists the shards once every rank is done (the barrier, here in order)
        build(folder, rank=rank, world=2)
    reference = tmp_path / "one"
    build(reference)
    for s in range(3):
        assert (folder / shard_name(s)).read_bytes() == (reference / shard_name(s)).read_bytes()


def test_a_folder_holding_another_cache_is_refused(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match=r"top_k: 257 there, 8 asked.*another --out"):
        build(tmp_path / "c", top_k=8)


@pytest.mark.parametrize("override, named", [
    ("seed=1", "seed"),
    ("data.window_bytes=300", "data.window_bytes"),
    ("distill.conversion=within_token", "distill.conversion"),
    ("teacher.bos_token=<|endoftext|>", "teacher.bos_token"),
    ("distill.method=uld", "distill.method=bld"),
])
def test_a_cache_for_another_run_is_refused(tmp_path, override, named):
    build(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match=named) as err:
        TeacherCache.open(tmp_path / "c", recipe(override), 1)
    assert "\n" not in str(err.value)


def test_a_cache_from_another_teacher_is_refused(tmp_path):
    build(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    manifest["teacher"]["fingerprint"] = "0" * 16
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="teacher.path: the cache was made with .*fingerprint 0000"):
        TeacherCache.open(tmp_path / "c", recipe(), 1)


def test_other_data_is_refused_at_its_first_window(tmp_path):
    build(tmp_path / "c")
    cache = TeacherCache.open(tmp_path / "c", recipe(), 1)
    with pytest.raises(TeacherCacheError, match="window 0's text differs.*other data"):
        cache.window_rows(0, "not the text the cache was made from")


def test_a_run_past_the_cached_windows_is_refused(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match=f"holds {WINDOWS} windows but this run takes {WINDOWS + 1}"):
        TeacherCache.open(tmp_path / "c", recipe(), WINDOWS + 1)
    cache = TeacherCache.open(tmp_path / "c", recipe(), WINDOWS)
    with pytest.raises(TeacherCacheError, match="past the 7 windows.*rather than wrap"):
        cache.window_rows(WINDOWS, "x")


def test_a_shard_damaged_after_the_build_is_refused_when_read(tmp_path):
    build(tmp_path / "c")
    path = tmp_path / "c" / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    cache = TeacherCache.open(tmp_path / "c", recipe(), WINDOWS)
    texts = stream_windows(recipe(), WINDOWS)
    cache.window_rows(0, texts[0])
    with pytest.raises(TeacherCacheError, match="shard-000001.safetensors: content differs.*again"):
        cache.window_rows(3, texts[3])
    untouched = (tmp_path / "c" / shard_name(0)).stat().st_mtime_ns
    build(tmp_path / "c")  # the same command again: the damaged shard is redone, the others kept
    assert (tmp_path / "c" / shard_name(0)).stat().st_mtime_ns == untouched
    fresh = TeacherCache.open(tmp_path / "c", recipe(), WINDOWS)
    assert torch.equal(fresh.window_rows(3, texts[3]), synthetic_rows([texts[3]])[0].float())


def test_targets_sit_at_each_windows_offset_plus_shift(tmp_path):
    """A dummy-prefix teacher (shift 1) reads text offset n at row n + 1: the layout of
    convert.dispatch, padded; the last row of a window is q_N (all EOT)."""
    from types import SimpleNamespace

    build(tmp_path / "c")
    r = recipe()
    texts = stream_windows(r, 2)
    batch = SimpleNamespace(teacher_shift=torch.tensor([1, 0]), packing=None)
    q, mask = TeacherCache.open(tmp_path / "c", r, 2).targets(batch, texts, 0)
    rows = synthetic_rows(texts)
    for b, shift in enumerate((1, 0)):
        n = len(texts[b].encode())
        assert torch.equal(q[b, shift:shift + n], rows[b].float())
        assert q[b, shift + n, 256] == 0 and torch.isinf(q[b, shift + n, :256]).all()
        assert mask[b, : shift + n + 1].all() and not mask[b, shift + n + 1:].any()
