"""The default row codec (bld_scale.cache.sqrt_rows: sqrt codes, each row's most probable value
implied) against a row-by-row loop, the packed "streams" shard (cache.streams) against its input,
and sqrt caches built, served, resumed and refused; caches of the sqrt layout before it still decode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.cache.layout import shard_name, shard_tensors
from bld_scale.cache.quantize import load_logprobs, load_sqrt_mass, store_logprobs, store_sqrt, store_sqrt_mass
from bld_scale.cache.ragged import entry_offsets, ragged_slice
from bld_scale.cache.rows import DEFAULT_SQRT_STEPS, decode_rows, encode_rows
from bld_scale.cache.streams import INDEX, PACKED, pack_streams, unpack_streams
from test_teacher_cache import WINDOWS, build
from test_teacher_cache_codec import TOOLS, assert_windows_decode, brute_force_kl_count, mixed_rows

DELIMITER = 0xFF


def defined_rows(n=200, seed=0):
    q = mixed_rows(n, seed)
    q = q[torch.isfinite(q).any(1)]
    q[::9] = torch.log_softmax(q[::9] + torch.nn.functional.one_hot(torch.tensor(255), 257) * 30, dim=1)  # 0xFF heavy
    return q


def reference_row(p: np.ndarray, n: int, steps: int, prior: np.ndarray):
    """One row coded and decoded by the codec's rules, written out: (symbols, codes, decoded p)."""
    order = sorted(range(255), key=lambda v: -p[v])
    top, others = order[0], sorted(order[1:n])
    codes = [0] + [min(max(round(math.sqrt(p[v]) * steps), 1), steps) for v in others]
    rest = p.sum() - p[order[:n]].sum()
    rest_code = min(round(math.sqrt(max(rest, 0.0)) * steps), steps)
    rest_back = (max(rest_code, 0.25) / steps) ** 2
    back = np.zeros(257)
    for v, c in zip(others, codes[1:]):
        back[v] = (c / steps) ** 2
    back[top] = max(1.0 - rest_back - back.sum(), steps ** -2.0)
    outside = np.setdiff1d(np.arange(257), [top, *others])
    back[outside] = rest_back * prior[outside] / prior[outside].sum()
    return [top, *others], codes, back / back.sum()


@pytest.mark.parametrize("lam, steps, cap", [(0.01, 47, 255), (0.003, 63, 255), (0.03, 20, 6)])
def test_sqrt_rows_match_a_row_by_row_loop(lam, steps, cap):
    q = defined_rows()
    stored = encode_rows(q, cap, "sqrt", kl_per_value=lam, sqrt_steps=steps)
    assert set(stored) == {"counts", "symbols", "sqrt_codes", "rest", "sqrt_steps"}
    assert int(stored["sqrt_steps"][0]) == steps
    profile = torch.linspace(1.0, 3.0, 257, dtype=torch.float64)
    profile /= profile.sum()
    decoded = decode_rows(stored, profile).double().exp().numpy()
    offsets = entry_offsets(stored["counts"]).tolist()
    p_all = q.exp().numpy()
    for r, p in enumerate(p_all):
        n = int(stored["counts"][r])
        assert n == brute_force_kl_count(p, lam, cap, candidates=255)[0], r  # 0xFF never stored
        symbols, codes, want = reference_row(p, n, steps, profile.numpy())
        a, b = offsets[r], offsets[r + 1]
        assert stored["symbols"][a:b].tolist() == symbols
        assert stored["sqrt_codes"][a:b].tolist() == codes
        np.testing.assert_allclose(decoded[r], want, rtol=1e-5, atol=1e-12)
    assert DELIMITER not in stored["symbols"].tolist()  # even in the rows where it holds most of the mass


def test_the_implied_value_is_within_the_others_errors_of_the_truth():
    q = defined_rows(seed=3)
    steps = DEFAULT_SQRT_STEPS
    stored = encode_rows(q, 255, "sqrt", kl_per_value=0.003)
    decoded = decode_rows(stored).double().exp()
    p = q.exp()
    offsets = entry_offsets(stored["counts"]).tolist()
    for r in range(len(q)):
        a, b = offsets[r], offsets[r + 1]
        top, others = int(stored["symbols"][a]), stored["symbols"][a + 1:b].long()
        assert top == int(p[r, :255].argmax())
        # each other value within half a step of its sqrt; the rest within half a step (or below it)
        errors = (2 * p[r, others].sqrt() + 0.5 / steps) * (0.5 / steps)
        rest = (p[r].sum() - p[r, top] - p[r, others].sum()).clamp(min=0.0).reshape(1)
        rest_error = float((load_sqrt_mass(store_sqrt_mass(rest.log(), steps), steps).exp() - rest).abs())
        if p[r, top] > 0.05:  # not raised to the least code: the row then sums to 1 as it is, nothing renormalised
            assert abs(float(decoded[r, top] - p[r, top])) <= float(errors.sum()) + rest_error + 1e-6, r


def test_a_packed_shard_unpacks_to_the_same_tensors():
    q = defined_rows(n=400, seed=7)
    stored = encode_rows(q, 255, "sqrt", kl_per_value=0.002, sqrt_steps=63)
    sizes = [150, 0, len(q) - 150]  # an empty window among them
    tensors = {"row_offsets": torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64),
               "window_sha256": torch.arange(24, dtype=torch.uint8).reshape(3, 8), **stored}
    packed = pack_streams(tensors)
    assert set(packed) == {*INDEX, *PACKED} and all(packed[k].dtype == torch.uint8 for k in PACKED)
    back = unpack_streams(packed)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    empty = {**{k: v[:0] for k, v in stored.items() if k != "sqrt_steps"}, "sqrt_steps": stored["sqrt_steps"],
             "row_offsets": torch.zeros(1, dtype=torch.int64), "window_sha256": torch.zeros(0, 8, dtype=torch.uint8)}
    assert all(torch.equal(unpack_streams(pack_streams(empty))[k], empty[k]) for k in empty)
    bad = {**tensors, "symbols": tensors["symbols"].clone()}
    bad["symbols"][5] = DELIMITER
    with pytest.raises(ValueError, match="0xff among a shard's stored symbols"):
        pack_streams(bad)


def test_an_undefined_row_is_refused_by_sqrt_rows():
    q = mixed_rows()  # row 4 has no mass
    with pytest.raises(ValueError, match="row 4 has no mass.*--dtype float32"):
        encode_rows(q, 255, "sqrt", kl_per_value=0.01)


def test_a_sqrt_cache_packs_its_streams_and_serves_each_window(tmp_path):
    folder = tmp_path / "c"
    manifest = build(folder, top_k=255, dtype="sqrt", kl_per_value=0.003, max_windows=WINDOWS - 3, compress=True,
                     sqrt_steps=40)
    assert manifest["compression"] == "streams" and manifest["sqrt_steps"] == 40
    data = (folder / shard_name(0, "streams")).read_bytes()
    assert shard_name(0, "streams") == "shard-000000.safetensors"
    from safetensors.torch import load

    assert set(load(data)) == {*INDEX, *PACKED}
    assert int(shard_tensors(data, "streams")["sqrt_steps"][0]) == 40
    cache = assert_windows_decode(folder, 255, "sqrt", kl_per_value=0.003, sqrt_steps=40)
    assert cache.codec == "KL per value 0.003 bits, k <= 255, sqrt (40 steps)"
    build(folder, top_k=255, dtype="sqrt", kl_per_value=0.003, max_windows=WINDOWS - 3, sqrt_steps=40)  # resumes
    with pytest.raises(TeacherCacheError, match="sqrt_steps: 40 there, 47 asked"):
        build(folder, top_k=255, dtype="sqrt", kl_per_value=0.003, max_windows=WINDOWS - 3)
    plain = tmp_path / "plain"
    assert "compression" not in build(plain, top_k=255, dtype="sqrt", kl_per_value=0.003, max_windows=WINDOWS - 3)
    assert_windows_decode(plain, 255, "sqrt", kl_per_value=0.003)


def as_sqrt_rows_before(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adaptive shard's tensors (float32 or uint8 values; the index, if any, kept) as the sqrt
    layout before `cache.sqrt_rows` held them: every kept value's 6-bit code (63 steps) in increasing
    byte value, the rest a 1/16-nat log code."""
    out = {k: v for k, v in stored.items() if k != "logprobs"}
    out["sqrt_probs"] = store_sqrt(load_logprobs(stored["logprobs"]))
    out["rest"] = store_logprobs(load_logprobs(stored["rest"]), "uint8")
    return out


def test_sqrt_caches_made_before_decode_as_they_did():
    q = mixed_rows(seed=8)
    old = as_sqrt_rows_before(encode_rows(q, 255, "float32", kl_per_value=0.003))
    decoded = decode_rows(old).double().exp().numpy()
    offsets = entry_offsets(old["counts"]).tolist()
    for r in range(len(q)):  # written out: (c / 63)^2 in place, the rest spread evenly, renormalised
        a, b = offsets[r], offsets[r + 1]
        kept = old["symbols"][a:b].long().numpy()
        rest = 0.0 if int(old["rest"][r]) == 255 else math.exp(-int(old["rest"][r]) / 16)  # code 255: no mass
        want = np.full(257, rest / (257 - len(kept)))
        want[kept] = (old["sqrt_probs"][a:b].double().numpy() / 63) ** 2
        np.testing.assert_allclose(decoded[r], want / want.sum(), rtol=1e-5, atol=1e-12)
    # the reader's window slices of such a shard decode as the whole does
    offsets = entry_offsets(old["counts"])
    for a, b in ((0, 37), (37, 38), (38, len(q))):
        assert torch.equal(decode_rows(ragged_slice(old, offsets, a, b)), decode_rows(old)[a:b])


@pytest.mark.parametrize("flags, want", [
    ([], {"dtype": "sqrt", "sqrt_steps": DEFAULT_SQRT_STEPS, "top_k": 255, "kl_per_value": 0.01, "tail_mass": 0.0}),
    (["--sqrt-steps", "63"], {"dtype": "sqrt", "sqrt_steps": 63}),
    (["--dtype", "uint8"], {"dtype": "uint8"}),
    (["--tail-mass", "0"], {"dtype": "float16", "top_k": 32}),
])
def test_the_cache_tool_defaults_to_sqrt_rows_of_the_default_steps(monkeypatch, flags, want):
    monkeypatch.syspath_prepend(TOOLS)
    import cache_teacher

    settings = cache_teacher.codec_settings(cache_teacher.parse(["--config", "r.yaml", "--out", "o", *flags]))
    assert {k: settings[k] for k in want} == want


def test_a_sqrt_cache_made_before_is_served_as_it_decodes_and_not_resumed(tmp_path):
    """A cache of the earlier sqrt layout (every value in 63-step codes, the rest a log code, xz over
    whole shards, no sqrt_steps in its header), made here by rewriting a uint8 cache's shards."""
    import json

    from bld_scale.cache.layout import MANIFEST, shard_bytes, sidecar_name
    from bld_scale.cache.reader import TeacherCache
    from bld_scale.cache.tail import previous_byte_contexts
    from bld_scale.checkpoint.manifest import hash_file
    from test_teacher_cache import recipe, stream_windows, synthetic_rows

    folder = tmp_path / "old"
    n = WINDOWS - 3
    build(folder, top_k=255, dtype="uint8", kl_per_value=0.003, max_windows=n, compress=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, entry in manifest["shards"].items():
        path = folder / name
        path.write_bytes(shard_bytes(as_sqrt_rows_before(shard_tensors(path.read_bytes(), "xz")), "xz"))
        entry.update(hash_file(path))
        sidecar = folder / sidecar_name(int(name.split("-")[1].split(".")[0]))
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **hash_file(path)}))
    manifest["dtype"] = "sqrt"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    r = recipe()
    cache = TeacherCache.open(folder, r, n)
    assert cache.codec == "KL per value 0.003 bits, k <= 255, sqrt"
    texts = stream_windows(r, n)
    for i, (text, row) in enumerate(zip(texts, synthetic_rows(texts))):
        want = decode_rows(as_sqrt_rows_before(encode_rows(row, 255, "uint8", kl_per_value=0.003)), cache.prior,
                           previous_byte_contexts(text.encode()))
        assert torch.equal(cache.window_rows(i, text), want)
    with pytest.raises(TeacherCacheError, match="sqrt_steps: None there, 47 asked"):
        build(folder, top_k=255, dtype="sqrt", kl_per_value=0.003, max_windows=n)
