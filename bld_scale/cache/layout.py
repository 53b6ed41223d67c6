"""A teacher cache's folder: its manifest, its shards, and whether a recipe may use it.

    manifest.json            what the cache is (`cache_header`): teacher and tokenizer fingerprints,
                             conversion mode, data and window settings, k, dtype, the adaptive
                             codec's rule, `kl_per_value` or `max_tail_mass` (neither: fixed
                             top-k), window count;
                             "complete": false while shards are being written, then true with
                             every shard's bytes, SHA-256 and window range ("shards") and the
                             mass truncation left out per outcome, summed ("tail_mass"), and per
                             context of the text over the first shard ("tail_mass_by_context", 16 x 257, with
                             "tail_context": how contexts are found): the profiles truncated
                             rows are decoded with (`cache.tail`)
    shard-000000.safetensors windows [s*W, (s+1)*W) of the stream (W = windows_per_shard), xz-compressed
                             as shard-000000.safetensors.xz when the header says "compression": "xz"
                             (the default but for dtype sqrt: a third of the bytes,
                             `tools/bench_teacher_cache.py`), or with each stream compressed apart
                             when it says "streams" (dtype sqrt's default, `cache.streams`):
                             `row_offsets` int64 [w+1] (the index: window i's rows are
                             row_offsets[i]:row_offsets[i+1], one row per text byte),
                             `window_sha256` uint8 [w, 8] (the start of each window text's SHA-256)
                             and the rows (`cache.rows`)
    shard-000000.json        that shard's bytes, SHA-256, windows and tail masses, written after it (atomically):
                             a shard without one, or that does not match it, is redone on a rerun

Hashing and fingerprints are the checkpoint package's (`checkpoint.manifest.hash_file`,
`checkpoint.identity`), atomic writes its `write_atomic`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bld_scale.cache.errors import TeacherCacheError
from bld_scale.checkpoint.identity import FINGERPRINT_RULE, fingerprint, same_content
from bld_scale.checkpoint.manifest import hash_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_BYTES = 8
ADAPTIVE_KEYS = ("max_tail_mass", "kl_per_value")  # the adaptive codec's rule, in a header only when used
# data settings that decide which text each window holds, in which order
WINDOW_KEYS = ("window_bytes", "format", "text_field", "normalize", "invalid_utf8", "streaming")


COMPRESSION = "xz"  # whole shards through Python's lzma (standard library)
STREAMS = "streams"  # dtype sqrt: each stream by its own coder (`cache.streams`)
COMPRESSIONS = (COMPRESSION, STREAMS)
XZ_PRESET = 6


def default_compression(dtype: str) -> str:
    """The compression a new cache of `dtype` gets unless told none."""
    return STREAMS if dtype == "sqrt" else COMPRESSION


def shard_name(index: int, compression: str | None = None) -> str:
    """Shard `index`'s file name in a cache of `compression` (its header's "compression", or None):
    a "streams" shard is a safetensors file too."""
    return f"shard-{index:06d}.safetensors" + (".xz" if compression == COMPRESSION else "")


def sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def window_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:DIGEST_BYTES]


def _identify(path: str) -> dict:
    return {"path": path, "fingerprint": fingerprint(path), "fingerprint_rule": FINGERPRINT_RULE}


def cache_header(recipe, *, top_k: int, dtype: str, windows: int, windows_per_shard: int,
                 tail_mass: float = 0.0, kl_per_value: float = 0.0, compression: str | None = None,
                 sqrt_steps: int | None = None) -> dict:
    """What a cache is made of and from: compared field by field before it is used or resumed.
    The adaptive codec's rule (`kl_per_value` or `max_tail_mass`) is written only when it is used,
    so the header of a cache made before that rule existed is unchanged (and such a cache resumes);
    likewise `sqrt_steps`, for dtype sqrt only."""
    d, t = recipe.data, recipe.teacher
    optional = {"max_tail_mass": tail_mass} if tail_mass else {}
    if kl_per_value:
        optional["kl_per_value"] = kl_per_value
    if dtype == "sqrt" and sqrt_steps is not None:
        optional["sqrt_steps"] = sqrt_steps
    if compression:  # likewise written only when used
        optional["compression"] = compression
    return {"teacher_cache": FORMAT_VERSION,
            "teacher": _identify(t.path), "teacher_tokenizer": _identify(t.tokenizer or t.path),
            "teacher_bos_token": t.bos_token, "conversion": recipe.distill.conversion,
            "data": {"train": list(d.train), "seed": recipe.seed, **{k: getattr(d, k) for k in WINDOW_KEYS}},
            "top_k": top_k, "dtype": dtype, **optional, "windows": windows, "windows_per_shard": windows_per_shard}


def window_index(texts, rows_per_window) -> dict:
    """A shard's index tensors for `texts` whose rows number `rows_per_window` (module docstring)."""
    import torch

    sizes = torch.tensor([0, *rows_per_window], dtype=torch.int64)
    return {"row_offsets": sizes.cumsum(0),
            "window_sha256": torch.tensor([list(window_digest(t)) for t in texts], dtype=torch.uint8)}


def shard_bytes(tensors: dict, compression: str | None) -> bytes:
    """A shard's file content: its tensors as safetensors, xz-compressed, or their streams packed
    (`compression` "xz", "streams"; None: as they are)."""
    import lzma

    from safetensors.torch import save

    if compression == STREAMS:
        from bld_scale.cache.streams import pack_streams

        return save(pack_streams(tensors))
    data = save(tensors)
    return lzma.compress(data, preset=XZ_PRESET) if compression else data


def shard_tensors(data: bytes, compression: str | None) -> dict:
    """`shard_bytes` reversed."""
    import lzma

    from safetensors.torch import load

    if compression == STREAMS:
        from bld_scale.cache.streams import unpack_streams

        return unpack_streams(load(data))
    return load(lzma.decompress(data) if compression else data)


def codec_label(header: dict) -> str:
    """How a cache's rows are stored, in words: "k=32, float16", "tail mass <= 0.005, k <= 255, uint8"
    or "KL per value 0.003 bits, k <= 255, uint8"."""
    tau, lam = header.get("max_tail_mass"), header.get("kl_per_value")
    if lam:
        kept = f"KL per value {lam:g} bits, k <= {header['top_k']}"
    elif tau:
        kept = f"tail mass <= {tau:g}, k <= {header['top_k']}"
    else:
        kept = f"k={header['top_k']}"
    steps = f" ({header['sqrt_steps']} steps)" if header.get("sqrt_steps") else ""
    return f"{kept}, {header['dtype']}{steps}"


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise TeacherCacheError(f"{path}: not valid JSON ({err}): the cache is damaged; build it again "
                                "(tools/cache_teacher.py) into an empty folder") from None
    if not isinstance(body, dict) or body.get("teacher_cache") != FORMAT_VERSION:
        raise TeacherCacheError(f"{path} is not a teacher cache manifest of format {FORMAT_VERSION}: point "
                                "distill.teacher_cache at a folder made by tools/cache_teacher.py")
    return body


def source_problems(cached: dict, recipe) -> list[str]:
    """Why `recipe` may not read targets from a cache whose header is `cached` (empty: it may).
    The data's files are compared by content later, window by window (`window_sha256`)."""
    problems = []
    t = recipe.teacher
    for key, path, recipe_key in (("teacher", t.path, "teacher.path"),
                                  ("teacher_tokenizer", t.tokenizer or t.path, "teacher.tokenizer")):
        saved = cached.get(key) or {}
        now = _identify(path)
        if not same_content(saved, now):
            problems.append(f"{recipe_key}: the cache was made with {saved.get('path')} (fingerprint "
                            f"{saved.get('fingerprint')}), this recipe has {path} (fingerprint {now['fingerprint']})")
    if cached.get("teacher_bos_token") != t.bos_token:
        problems.append(f"teacher.bos_token: the cache was made with {cached.get('teacher_bos_token')!r}, "
                        f"this recipe has {t.bos_token!r}")
    if cached.get("conversion") != recipe.distill.conversion:
        problems.append(f"distill.conversion: the cache holds {cached.get('conversion')!r} targets, this "
                        f"recipe asks for {recipe.distill.conversion!r}")
    data = cached.get("data") or {}
    now = {"seed": recipe.seed, **{k: getattr(recipe.data, k) for k in WINDOW_KEYS}}
    for key, value in now.items():
        if data.get(key) != value:
            name = "seed" if key == "seed" else f"data.{key}"
            problems.append(f"{name}: the cache was made with {data.get(key)!r}, this recipe has {value!r} "
                            "(other windows, or another order)")
    return problems


def shard_problem(folder: Path, index: int, entry: dict | None, compression: str | None = None) -> str | None:
    """Why shard `index` is not intact (None: it matches its record `entry` by size and SHA-256)."""
    path = Path(folder) / shard_name(index, compression)
    if entry is None:
        return f"{path.name}: no record of it (an interrupted write)"
    if not path.is_file():
        return f"{path.name}: missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"{path.name}: {path.stat().st_size} bytes, its record says {entry.get('bytes')} (truncated or replaced)"
    if hash_file(path)["sha256"] != entry.get("sha256"):
        return f"{path.name}: content differs from its SHA-256 record (damaged)"
    return None
