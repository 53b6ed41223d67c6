"""bld_scale: cross-tokenizer distillation through a byte-level interface.

The public API most users need is importable from here; the layers are described in
docs/DESIGN.md.
"""
from bld_scale.convert import EOT, byte_logprobs, byte_logprobs_batch
from bld_scale.tokenize import TokenBytes

__all__ = ["EOT", "TokenBytes", "byte_logprobs", "byte_logprobs_batch"]
