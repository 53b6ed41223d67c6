"""Comparing two saved Hugging Face student folders (a run's final/ and a checkpoint's export)."""
from __future__ import annotations

from pathlib import Path

EXPORT_ONLY = {"bld_export.json"}  # tools/export_hf.py notes which checkpoint it came from


def assert_same_hf_folder(got: Path, want: Path) -> list[str]:
    """Same files; every tensor of every .safetensors equal (values and dtype), every other file
    byte-identical. Returns the tensor names compared."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in Path(got).iterdir())
    assert files == sorted(p.name for p in Path(want).iterdir() if p.name not in EXPORT_ONLY), files
    compared = []
    for name in files:
        if name.endswith(".safetensors"):
            a, b = load_file(Path(got) / name), load_file(Path(want) / name)
            assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
            for key in a:
                assert a[key].dtype == b[key].dtype, (name, key, a[key].dtype, b[key].dtype)
                assert torch.equal(a[key], b[key]), (name, key, (a[key] - b[key]).abs().max().item())
                compared.append(f"{name}:{key}")
        else:
            assert (Path(got) / name).read_bytes() == (Path(want) / name).read_bytes(), name
    return compared
