"""bld_scale: cross-tokenizer distillation through a byte-level interface.

The public API most users need is importable from here (`from bld_scale import TokenBytes,
byte_logprobs, byte_logprobs_batch`); the layers are described in docs/DESIGN.md. The names load
on first use, so importing a light submodule (the entry point's signal handlers, the recipe) does
not import torch.
"""
from importlib import import_module

_PUBLIC = {
    "EOT": "bld_scale.convert",
    "byte_logprobs": "bld_scale.convert",
    "byte_logprobs_batch": "bld_scale.convert",
    "TokenBytes": "bld_scale.tokenize",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'bld_scale' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
