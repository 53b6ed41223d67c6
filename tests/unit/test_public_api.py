"""The top-level API and the light import path of the entry point."""
from __future__ import annotations

import subprocess
import sys


def test_public_names_import_from_the_top_level():
    from bld_scale import EOT, TokenBytes, byte_logprobs, byte_logprobs_batch
    from bld_scale.convert import byte_logprobs as direct
    from bld_scale.tokenize.token_bytes import TokenBytes as direct_tb

    assert byte_logprobs is direct and TokenBytes is direct_tb and EOT == 256
    assert callable(byte_logprobs_batch)


def test_unknown_top_level_name_is_an_attribute_error():
    import bld_scale

    try:
        bld_scale.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_signal_handlers_and_recipe_load_without_torch():
    # launch/distill.py installs its stop handlers first: a signal during the heavy imports must
    # find them in place, so that path must not import torch.
    code = ("import sys; import bld_scale.checkpoint.preemption, bld_scale.config; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
