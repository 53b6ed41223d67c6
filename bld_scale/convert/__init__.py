"""Teacher next-token distributions -> next-byte distributions (docs/byte-interface.md).

Modules, lowest first: `byte_rows` (the output rows), `running_sums` (range masses and their
log-space mixing), `tree_forward` (one teacher forward over a tree of contexts), `exact_contexts`
(the contexts mode "exact" adds); the modes `one_pass` ("cover", "within_token") and `exact`;
`dispatch`, the one place a mode is chosen.
"""
from bld_scale.convert.byte_rows import EOT
from bld_scale.convert.dispatch import MODES, TeacherTargets, byte_logprobs, byte_logprobs_batch, teacher_byte_targets

__all__ = ["EOT", "MODES", "TeacherTargets", "byte_logprobs", "byte_logprobs_batch", "teacher_byte_targets"]
