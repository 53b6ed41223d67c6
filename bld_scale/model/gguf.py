"""A GGUF file (llama.cpp's single-file format) as a Hugging Face model folder.

transformers reads GGUF through the `gguf` package and dequantises every tensor to fp32 on load;
`convert_gguf` saves that model (safetensors, config.json without the GGUF quantization entry) and
the tokenizer built from the file's metadata (its BOS / EOS ids included), so the rest of the
project sees an ordinary HF folder. `cached_hf_folder` does this once per file content, for a
recipe whose teacher.path is a .gguf file.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DTYPES = ("fp32", "bf16")


class GGUFError(ValueError):
    """A GGUF file that cannot become an HF folder; the message names the file and the fix."""


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def load_gguf_model(src: str | os.PathLike):
    """(model, tokenizer) read from the GGUF file `src`, weights dequantised to fp32."""
    src = Path(src)
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    if not is_gguf_file(src):
        raise GGUFError(f"{src}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise GGUFError(f"{src}: reading GGUF needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - transformers raises several types; one message for all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GGUFError(f"{src}: transformers cannot read this GGUF file ({type(err).__name__}: {first}); "
                        "only architectures transformers supports for GGUF can be converted") from err
    return model.eval(), tok


def convert_gguf(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write `src` (a .gguf file) into `out_dir` as an HF folder: model.safetensors, config.json,
    generation_config.json, tokenizer files. `dtype` fp32 keeps the dequantised weights exactly;
    bf16 rounds them (half the size)."""
    import torch

    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model, tok = load_gguf_model(src)
    # The weights are plain tensors now: a folder that still said "gguf" would be loaded as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of the whole file, 16 hex digits: the cache key of its converted folder."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cached_hf_folder(src: str | os.PathLike, cache_root: str | os.PathLike, log=print) -> Path:
    """The HF folder converted from `src`, at `cache_root/<sha256 of src>/` (fp32): converted on the
    first call, reused afterwards. Ranks that ask at once wait on a lock file while one converts;
    the folder appears by rename, complete or not at all."""
    root = Path(cache_root)
    target = root / file_digest(src)
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").is_file():
                log(f"converting {src} into an HF folder at {target} (once per file content)")
                tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
                try:
                    convert_gguf(src, tmp, "fp32")
                    os.replace(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
