"""The adaptive row codec (bld_scale.cache.ragged) and uint8 log-probabilities (cache.quantize),
against direct loops; and caches of every layout, fixed top-k as made before the adaptive codec
included, built, resumed and served by window."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.cache.layout import MANIFEST, shard_name, sidecar_name
from bld_scale.cache.quantize import load_logprobs, load_sqrt, store_logprobs, store_sqrt
from bld_scale.cache.ragged import entry_offsets
from bld_scale.cache.reader import TeacherCache
from bld_scale.cache.rows import bytes_per_row, context_tail_sums, decode_rows, encode_rows, tail_prior, tail_sums
from bld_scale.cache.tail import previous_byte_contexts, window_contexts
from test_teacher_cache import PER_SHARD, WINDOWS, build, recipe, stream_windows, synthetic_rows

TOOLS = str(Path(__file__).resolve().parents[2] / "tools")  # the bench and the cache tool import from here


def mixed_rows(n=260, seed=0):
    """Diffuse rows, peaked rows (one value of ~0.999), rows with few outcomes of non-zero mass,
    zero-mass (-inf) byte values and EOT mass, an undefined row (all -inf)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6
    logits = torch.randn(n, 257, generator=g, dtype=torch.float64) * scale
    logits[::5, 7] += 12.0  # peaked
    logits[1::7, 100:160] = -math.inf
    logits[2::11, 3:257] = -math.inf  # three byte values, no EOT
    logits[3::13, 256] += 6.0  # much EOT mass, which does not count against the tail mass
    q = torch.log_softmax(logits, dim=1)
    q[4] = -math.inf
    return q


def reference(q: torch.Tensor, tau: float, cap: int, prior):
    """Row by row: keep byte values, most probable first, while the byte values' mass left out is > tau."""
    p_all = q.exp().numpy()
    out, counts = np.empty_like(p_all), []
    for p in p_all:
        order = sorted(range(256), key=lambda v: -p[v])
        kept, left = [], p[:256].sum()
        for v in order:
            if kept and (left <= tau or len(kept) == cap):
                break
            if p[v] == 0 and kept:
                break
            kept.append(v)
            left -= p[v]
        counts.append(len(kept))
        others = np.setdiff1d(np.arange(257), kept)
        w = np.ones(257) if prior is None else prior.numpy().copy()
        row = np.empty(257)
        row[kept] = p[kept]
        row[others] = p[others].sum() * w[others] / w[others].sum()
        out[len(counts) - 1] = row / row.sum() if row.sum() > 0 else row
    return out, np.array(counts)


@pytest.mark.parametrize("tau, cap", [(0.01, 255), (0.001, 255), (0.1, 4), (1e-9, 255)])
def test_adaptive_rows_match_a_direct_loop(tau, cap):
    q = mixed_rows()
    stored = encode_rows(q, cap, "float32", tau)
    profile = torch.linspace(1.0, 3.0, 257, dtype=torch.float64)
    for prior in (None, profile / profile.sum()):
        want, counts = reference(q, tau, cap, prior)
        np.testing.assert_array_equal(stored["counts"].numpy(), counts)
        got = decode_rows(stored, prior).double().exp().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert stored["symbols"].shape == stored["logprobs"].shape == (counts.sum(),)
    assert torch.isinf(decode_rows(stored)[4]).all()  # the undefined row stays undefined


def test_each_row_leaves_at_most_tau_out_with_the_fewest_values():
    q = mixed_rows(seed=1)
    tau = 0.003
    stored = encode_rows(q, 255, "float32", tau)
    counts = stored["counts"].long()
    p = q.exp()
    ordered = torch.sort(p[:, :256], dim=1, descending=True).values
    total = p[:, :256].sum(1)  # EOT is never stored: its mass does not count against tau
    nonzero = (ordered > 0).sum(1)
    for r in range(len(q)):
        c = int(counts[r])
        assert c >= 1
        left = float(total[r] - ordered[r, :c].sum())
        assert left <= tau or c == 255 or (nonzero[r] == 0 and c == 1)  # the cap; an undefined row
        if c > 1:  # one value fewer would leave more than tau out
            assert float(total[r] - ordered[r, :c - 1].sum()) > tau
    peaked = total - p[:, :256].max(1).values <= tau
    assert peaked.sum() > 10 and (counts[peaked] == 1).all()
    eot = p[:, 256] > 0.5
    assert eot.sum() >= 5 and (counts[eot] < 255).all()  # EOT mass does not make a row keep the cap


def brute_force_kl_count(p: np.ndarray, lam: float, cap: int, candidates: int = 256) -> tuple[int, list[float]]:
    """One row: for every n, decode it with its n most probable byte values (of the first
    `candidates`) kept and the rest spread evenly over the other outcomes (one row of a matrix
    each) and take KL(q || that) directly; the n minimising KL + lam n."""
    order = np.argsort(-p[:candidates], kind="stable")
    counts = np.arange(1, min(cap, max(1, int((p[:candidates] > 0).sum()))) + 1)
    kept = np.zeros((len(counts), 257), dtype=bool)
    for i, n in enumerate(counts):
        kept[i, order[:n]] = True
    rest = np.where(kept, 0.0, p).sum(1, keepdims=True)
    approx = np.where(kept, p, rest / (~kept).sum(1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        kls = np.where(p > 0, p * np.log2(p / approx), 0.0).sum(1)
    return int(counts[np.argmin(kls + lam * counts)]), kls.tolist()


@pytest.mark.parametrize("lam, cap", [(0.003, 255), (0.03, 255), (0.0003, 12)])
def test_kl_per_value_counts_match_a_brute_force(lam, cap):
    q = mixed_rows(n=60, seed=5)
    stored = encode_rows(q, cap, "float32", kl_per_value=lam)
    counts = stored["counts"].numpy()
    p_all = q.exp().numpy()
    for r, p in enumerate(p_all):
        want, kls = brute_force_kl_count(p, lam, cap)
        assert counts[r] == want, (r, counts[r], want)
    # decoded evenly, each row loses the KL its count was chosen for
    got = decode_rows(stored).double()
    for r in (0, 1, 5, 9):
        p = q[r].exp().double()
        kl = float((p * (q[r] - got[r])).nansum()) / math.log(2)
        assert kl == pytest.approx(brute_force_kl_count(p_all[r], lam, cap)[1][counts[r] - 1], abs=1e-6)


def test_a_higher_kl_per_value_keeps_fewer_values_and_loses_more():
    q = mixed_rows(seed=6)
    p = q.exp()
    previous_counts, previous_kl = None, -1.0
    for lam in (1e-5, 1e-3, 0.01, 0.1, 0.5):
        stored = encode_rows(q, 255, "float32", kl_per_value=lam)
        counts = stored["counts"].long()
        decoded = decode_rows(stored).double()
        kl = float(torch.where(p > 0, p * (q - decoded), torch.zeros_like(p)).sum())
        if previous_counts is not None:
            assert (counts <= previous_counts).all() and kl >= previous_kl - 1e-12
        previous_counts, previous_kl = counts, kl
    peaked = p[:, :256].max(1).values > 0.999
    assert peaked.sum() >= 5 and (previous_counts[peaked] == 1).all()  # 7 such rows here


def assert_windows_decode(folder, k, dtype, **codec) -> TeacherCache:
    """The cache in `folder` (WINDOWS - 3 windows) serves each window as its rows decode through
    the codec and the cache's own profile, by context when it has one."""
    r = recipe()
    texts = stream_windows(r, WINDOWS - 3)
    cache = TeacherCache.open(folder, r, WINDOWS - 3)
    for i, (text, row) in enumerate(zip(texts, synthetic_rows(texts))):
        contexts = previous_byte_contexts(text.encode()) if cache.prior.dim() == 2 else None
        want = decode_rows(encode_rows(row, k, dtype, **codec), cache.prior, contexts)
        assert torch.equal(cache.window_rows(i, text), want)
    return cache


def test_a_kl_per_value_cache_records_its_rule_and_refuses_another(tmp_path):
    folder = tmp_path / "c"
    manifest = build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    assert manifest["kl_per_value"] == 0.003 and "max_tail_mass" not in manifest
    cache = assert_windows_decode(folder, 255, "uint8", kl_per_value=0.003)
    assert cache.codec == "KL per value 0.003 bits, k <= 255, uint8" and cache.prior.shape == (16, 257)
    build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)  # resumes
    with pytest.raises(TeacherCacheError, match=r"max_tail_mass: None there, 0.005 asked.*kl_per_value: 0.003 there, "
                                                r"None asked"):
        build(folder, top_k=255, dtype="uint8", tail_mass=0.005, max_windows=WINDOWS - 3)
    with pytest.raises(TeacherCacheError, match=r"kl_per_value: 0.003 there, None asked"):
        build(folder, top_k=255, dtype="uint8", max_windows=WINDOWS - 3)  # a fixed top-k is not it either
    with pytest.raises(TeacherCacheError, match="one rule"):
        build(tmp_path / "d", top_k=255, dtype="uint8", tail_mass=0.005, kl_per_value=0.003)
    with pytest.raises(TeacherCacheError, match="KL per value 2"):
        build(tmp_path / "d", top_k=255, dtype="uint8", kl_per_value=2.0)
    assert not (tmp_path / "d").exists()


def test_compressed_shards_hold_the_plain_bytes_and_serve_the_same_rows(tmp_path):
    import lzma

    settings = dict(top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    plain = build(tmp_path / "plain", **settings)
    packed = build(tmp_path / "xz", compress=True, **settings)
    assert "compression" not in plain and packed["compression"] == "xz"
    assert sorted(packed["shards"]) == [shard_name(0, "xz"), shard_name(1, "xz")] == \
        ["shard-000000.safetensors.xz", "shard-000001.safetensors.xz"]
    for s in (0, 1):  # lzma's own container: the plain shard's exact bytes inside
        assert lzma.decompress((tmp_path / "xz" / shard_name(s, "xz")).read_bytes()) == \
            (tmp_path / "plain" / shard_name(s)).read_bytes()
    r = recipe()
    texts = stream_windows(r, WINDOWS - 3)
    a, b = TeacherCache.open(tmp_path / "plain", r, WINDOWS - 3), TeacherCache.open(tmp_path / "xz", r, WINDOWS - 3)
    for i, text in enumerate(texts):
        assert torch.equal(a.window_rows(i, text), b.window_rows(i, text))


def test_a_damaged_compressed_shard_is_refused_then_redone(tmp_path):
    folder = tmp_path / "c"
    settings = dict(top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3, compress=True)
    build(folder, **settings)
    path = folder / shard_name(1, "xz")
    good = path.read_bytes()
    path.write_bytes(good[:-8] + bytes(8))  # same size: only the SHA-256 tells
    r = recipe()
    texts = stream_windows(r, WINDOWS - 3)
    cache = TeacherCache.open(folder, r, WINDOWS - 3)
    with pytest.raises(TeacherCacheError, match=r"shard-000001.safetensors.xz: content differs.*again"):
        cache.window_rows(3, texts[3])
    build(folder, **settings)
    assert path.read_bytes() == good


def test_a_plain_cache_resumed_by_a_compressing_command_stays_plain(tmp_path):
    folder = tmp_path / "c"
    settings = dict(top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    build(folder, compress=False, **settings)
    (folder / shard_name(1)).unlink()
    manifest = build(folder, compress=True, **settings)  # the default command of today
    assert "compression" not in manifest and (folder / shard_name(1)).is_file()
    assert not list(folder.glob("*.xz"))


def test_a_cache_of_an_unknown_compression_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "c"
    build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3, compress=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "compression": "zstd"}))
    with pytest.raises(TeacherCacheError, match=r"compressed with 'zstd'.*only 'xz'"):
        TeacherCache.open(folder, recipe(), WINDOWS - 3)


def test_uint8_log_probabilities_are_within_a_32nd_of_a_nat():
    x = torch.cat([-torch.rand(10000, dtype=torch.float64) * 15.875, torch.tensor([0.0, -15.875, -20.0, -math.inf])])
    codes = store_logprobs(x, "uint8")
    assert codes.dtype == torch.uint8
    back = load_logprobs(codes)
    assert (back[:-2] - x[:-2]).abs().max() <= 1 / 32 + 1e-12
    assert back[-2] == -15.875 and back[-1] == -math.inf  # below the range: raised to it; zero mass stays zero


def test_uint8_rows_decode_to_proper_distributions_near_the_float32_ones():
    q = mixed_rows(seed=2)
    exact = decode_rows(encode_rows(q, 255, "float32", 0.01)).double()
    coded = decode_rows(encode_rows(q, 255, "uint8", 0.01)).double()
    defined = torch.isfinite(exact).any(1)
    assert torch.allclose(coded[defined].exp().sum(1), torch.ones(int(defined.sum()), dtype=torch.float64), atol=1e-6)
    finite = torch.isfinite(exact) & (exact > -15)
    assert (coded[finite] - exact[finite]).abs().max() <= 2 / 32  # 1/32 per value, 1/32 renormalising
    assert torch.equal(torch.isinf(coded), torch.isinf(exact))


def test_sqrt_codes_are_within_half_a_step_of_the_square_root():
    g = torch.Generator().manual_seed(0)
    p = torch.cat([torch.rand(10000, generator=g, dtype=torch.float64), torch.tensor([1.0, 1e-3, 6e-5, 1e-12])])
    codes = store_sqrt(p.log())
    assert codes.dtype == torch.uint8 and int(codes.min()) == 1 and int(codes.max()) == 63
    back = load_sqrt(codes).exp()
    assert (back.sqrt() - p.sqrt())[p >= (0.5 / 63) ** 2].abs().max() <= 0.5 / 63 + 1e-12
    least = back[p < (0.5 / 63) ** 2]  # the least code: never zero
    assert back[-4] == 1.0 and len(least) >= 2 and torch.allclose(least, torch.full_like(least, (1 / 63) ** 2))
    with pytest.raises(ValueError, match="store_sqrt"):
        store_logprobs(p.log(), "sqrt")


def test_sqrt_codes_are_refused_outside_the_adaptive_layout(tmp_path):
    q = mixed_rows(seed=5)
    for k, tau in ((16, 0.0), (257, 0.0), (257, 0.01)):
        with pytest.raises(ValueError, match="sqrt codes the adaptive rows"):
            encode_rows(q, k, "sqrt", tau)
    with pytest.raises(TeacherCacheError, match="sqrt codes the adaptive rows"):
        build(tmp_path / "c", top_k=32, dtype="sqrt")
    assert not (tmp_path / "c").exists()


def test_adaptive_rows_store_each_rows_byte_values_in_increasing_order():
    q = mixed_rows(seed=6)
    stored = encode_rows(q, 255, "float32", kl_per_value=0.003)
    offsets = entry_offsets(stored["counts"]).tolist()
    permuted = {**stored, "symbols": stored["symbols"].clone(), "logprobs": stored["logprobs"].clone()}
    for row, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        symbols = stored["symbols"][a:b].long()
        assert bool((symbols[1:] > symbols[:-1]).all())
        assert torch.equal(stored["logprobs"][a:b], q[row, symbols].float())
        by_mass = torch.argsort(stored["logprobs"][a:b], descending=True, stable=True)
        permuted["symbols"][a:b], permuted["logprobs"][a:b] = stored["symbols"][a:b][by_mass], stored["logprobs"][a:b][by_mass]
    # the same entries in order of probability, as caches made before stored them, decode the same
    assert not torch.equal(permuted["symbols"], stored["symbols"])
    assert torch.equal(decode_rows(permuted), decode_rows(stored))


def test_tail_contexts_are_the_class_of_the_previous_byte():
    text = "Ab. é\n9\t(x),'\x01😀-".encode()
    # start, A, b, ., space, é's lead, é's continuation, newline, 9, tab, (, x, ), comma, ', \x01,
    # then the 4-byte emoji: its lead and three continuation bytes
    want = [0, 4, 3, 6, 1, 13, 12, 2, 5, 2, 9, 3, 9, 7, 8, 11, 15, 12, 12, 12]
    assert previous_byte_contexts(text).tolist() == want
    assert previous_byte_contexts("€".encode()).tolist() == [0, 14, 12]  # after a 3-byte lead
    assert previous_byte_contexts(b"").tolist() == [] and previous_byte_contexts(b"#").tolist() == [0]
    assert previous_byte_contexts(b"#@").tolist() == [0, 10]


def test_whole_rows_ignore_the_tail_mass_and_refuse_uint8():
    q = synthetic_rows(["whole rows"])[0]
    assert torch.equal(decode_rows(encode_rows(q, 257, "float32", 0.005)), q.float())
    with pytest.raises(ValueError, match="257.*float32"):
        encode_rows(q, 257, "uint8")
    with pytest.raises(ValueError, match="1..255"):
        encode_rows(q, 256, "uint8", 0.005)


def test_stored_bytes_per_row():
    q = mixed_rows(seed=3)
    stored = encode_rows(q, 255, "uint8", 0.01)
    size = sum(t.numel() * t.element_size() for t in stored.values())
    assert size == pytest.approx(len(q) * bytes_per_row(255, "uint8", float(stored["counts"].double().mean())))
    assert bytes_per_row(16, "uint8") == 16 * 2 + 1


def test_an_adaptive_cache_serves_each_window_as_its_rows_decode(tmp_path):
    manifest = build(tmp_path / "c", top_k=255, dtype="uint8", tail_mass=0.01, max_windows=WINDOWS - 3)
    assert manifest["max_tail_mass"] == 0.01 and len(manifest["shards"]) == 2  # 3 + 1 windows
    r = recipe()
    texts = stream_windows(r, WINDOWS - 3)
    rows = synthetic_rows(texts)
    q = torch.cat(rows)
    first = torch.cat(rows[:PER_SHARD])  # the profile by context: the first shard's rows
    contexts = window_contexts(texts[:PER_SHARD])
    want_prior = tail_prior(tail_sums(q, encode_rows(q, 255, "uint8", 0.01)),
                            context_tail_sums(first, encode_rows(first, 255, "uint8", 0.01), contexts))
    cache = TeacherCache.open(tmp_path / "c", r, WINDOWS - 3)
    assert want_prior.shape == (16, 257) and torch.allclose(cache.prior, want_prior, rtol=1e-12)
    for i, (text, row) in enumerate(zip(texts, rows)):
        want = decode_rows(encode_rows(row, 255, "uint8", 0.01), want_prior, previous_byte_contexts(text.encode()))
        assert torch.equal(cache.window_rows(i, text), want)


def test_a_fixed_top_k_cache_made_before_the_adaptive_codec_still_reads_and_resumes(tmp_path):
    folder = tmp_path / "c"
    manifest = build(folder, top_k=8, dtype="float16", max_windows=WINDOWS - 3)
    assert "max_tail_mass" not in manifest  # the header caches had before
    from safetensors.torch import load_file

    shard = load_file(str(folder / shard_name(0)))  # the layout they had: one [R, k] row per text byte
    assert set(shard) == {"row_offsets", "window_sha256", "symbols", "logprobs", "rest"}
    assert shard["symbols"].shape == shard["logprobs"].shape == (int(shard["row_offsets"][-1]), 8)
    assert_windows_decode(folder, 8, "float16")
    build(folder, top_k=8, dtype="float16", max_windows=WINDOWS - 3)  # the same command resumes it
    with pytest.raises(TeacherCacheError, match=r"max_tail_mass: None there, 0.005 asked.*another --out"):
        build(folder, top_k=8, dtype="float16", tail_mass=0.005, max_windows=WINDOWS - 3)
    assert json.loads((folder / MANIFEST).read_text())["complete"]


def test_a_cache_made_before_tail_contexts_decodes_with_its_one_profile_and_resumes(tmp_path):
    folder = tmp_path / "c"
    build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    # what such a cache holds: no per-context sums in its shard records or its manifest
    for path in [*folder.glob("shard-*.json"), folder / MANIFEST]:
        body = json.loads(path.read_text())
        body.pop("tail_mass_by_context", None)
        body.pop("tail_context", None)
        path.write_text(json.dumps(body))
    assert assert_windows_decode(folder, 255, "uint8", kl_per_value=0.003).prior.shape == (257,)
    (folder / sidecar_name(1)).unlink()  # another shard redone by this version: still one profile
    manifest = build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    assert "tail_mass_by_context" not in manifest
    assert assert_windows_decode(folder, 255, "uint8", kl_per_value=0.003).prior.shape == (257,)
    (folder / sidecar_name(0)).unlink()  # the first shard redone: its record has the per-context sums
    manifest = build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    assert manifest["tail_context"] == "previous byte class"
    assert assert_windows_decode(folder, 255, "uint8", kl_per_value=0.003).prior.shape == (16, 257)
    assert "tail_mass_by_context" not in json.loads((folder / sidecar_name(1)).read_text())  # the first shard's only


def test_an_unknown_tail_context_is_refused(tmp_path):
    folder = tmp_path / "c"
    build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=WINDOWS - 3)
    body = json.loads((folder / MANIFEST).read_text())
    body["tail_context"] = "previous two bytes"
    (folder / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(TeacherCacheError, match="'previous two bytes'.*build it again"):
        TeacherCache.open(folder, recipe(), WINDOWS - 3)


def test_bad_codec_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TeacherCacheError, match="tail mass 1.5"):
        build(tmp_path / "c", top_k=255, dtype="uint8", tail_mass=1.5)
    with pytest.raises(TeacherCacheError, match="dtype 'int4'"):
        build(tmp_path / "c", top_k=8, dtype="int4")
    assert not (tmp_path / "c").exists()


def test_the_bench_counts_token_rows_by_their_tail_mass(monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)
    from bench_teacher_cache import token_row_counts

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
    logits = p.log().unsqueeze(0)  # one window of three positions
    mask = torch.tensor([[1, 1, 0]])  # the third is padding: not counted
    assert token_row_counts(logits, mask, 0.06).tolist() == [3, 1]  # 0.05 left out; 0.03 left out
    assert token_row_counts(logits, mask, 0.015).tolist() == [4, 3]  # nothing left out; 0.01 left out


@pytest.mark.parametrize("flags, message", [
    (["--tail-mass", "0.01", "--kl-per-value", "0.003"], "both given.*one rule"),
    (["--kl-per-value", "1.5"], "KL per value 1.5 is out of range"),
    (["--top-k", "257", "--dtype", "uint8"], "257.*float32"),
    (["--tail-mass", "0", "--dtype", "sqrt"], "sqrt codes the adaptive rows"),
    (["--dtype", "uint8", "--sqrt-steps", "31"], "--sqrt-steps 31 sets the steps of sqrt codes.*uint8"),
    (["--sqrt-steps", "0"], "sqrt steps 0 is out of range"),
])
def test_the_cache_tool_refuses_codec_settings_before_loading_anything(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.syspath_prepend(TOOLS)
    import cache_teacher

    def no_loading(*a, **k):
        raise AssertionError("the recipe or teacher was loaded before the codec was checked")

    monkeypatch.setattr("bld_scale.config.load_recipe", no_loading)
    monkeypatch.setattr(cache_teacher, "load_teacher", no_loading)
    out = tmp_path / "c"
    assert cache_teacher.main(["--config", "unused.yaml", "--out", str(out), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
