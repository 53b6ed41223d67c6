"""Teacher next-token distributions -> next-byte distributions (docs/byte-interface.md)."""
from bld_scale.convert.one_pass import EOT, MODES, byte_logprobs, byte_logprobs_batch

__all__ = ["EOT", "MODES", "byte_logprobs", "byte_logprobs_batch"]
