"""student.attn_implementation: `auto` takes FlashAttention-2 only where it can run, and a recipe
that forces flash_attention_2 where it cannot is refused at validation, naming the key and the fix.

Each branch is set up by hand: flash_attn absent, broken, too old or present (a stand-in module),
and CUDA present or not (torch.cuda.is_available patched).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from bld_scale.config import RecipeError, flash_attention_problem, load_recipe, validate_attention
from bld_scale.model.student import flash_attention_available, pick_attn_implementation

DEMO = Path(__file__).resolve().parents[2] / "launch" / "recipes" / "demo.yaml"  # its files exist
FORCE_FLASH = ["student.attn_implementation=flash_attention_2"]


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """set(flash=..., cuda=...): flash is "absent", "broken", "v1" or "ok"."""
    def set_state(flash: str, cuda: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        if flash == "absent":
            monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ModuleNotFoundError
        elif flash == "broken":  # installed, but built for another torch
            pkg = tmp_path / "site" / "flash_attn"
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text('raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")\n')
            monkeypatch.syspath_prepend(str(tmp_path / "site"))
        else:
            module = types.ModuleType("flash_attn")
            module.__version__ = "1.0.9" if flash == "v1" else "2.7.4"
            monkeypatch.setitem(sys.modules, "flash_attn", module)
    return set_state


@pytest.mark.parametrize("flash, cuda, reason", [
    ("absent", True, "the flash_attn package is not installed"),
    ("broken", True, "flash_attn fails to import (flash_attn_2_cuda.so: undefined symbol"),
    ("v1", True, "flash_attn 1.0.9 is installed (FlashAttention-2 needs version 2)"),
    ("ok", False, "no CUDA device is available"),
    ("absent", False, "the flash_attn package is not installed"),
])
def test_flash_unavailable(machine, flash, cuda, reason):
    machine(flash, cuda)
    assert flash_attention_problem().startswith(reason)
    assert not flash_attention_available()
    assert pick_attn_implementation("auto") == "sdpa"
    with pytest.raises(RuntimeError, match="flash_attn"):
        pick_attn_implementation("flash_attention_2")
    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO, FORCE_FLASH)
    msg = str(e.value)
    assert msg.startswith("student.attn_implementation: flash_attention_2 needs the flash-attn package")
    assert reason in msg and "student.attn_implementation=auto" in msg and "pip install flash-attn" in msg


def test_flash_available(machine):
    machine("ok", True)
    assert flash_attention_problem() is None and flash_attention_available()
    assert pick_attn_implementation("auto") == "flash_attention_2"
    assert pick_attn_implementation("flash_attention_2") == "flash_attention_2"
    assert pick_attn_implementation("sdpa") == "sdpa"  # forcing another one still wins
    assert load_recipe(DEMO, FORCE_FLASH).student.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("impl", ["auto", "sdpa", "eager"])
def test_other_choices_never_need_flash(machine, impl):
    machine("absent", False)
    load_recipe(DEMO, [f"student.attn_implementation={impl}"])
    assert pick_attn_implementation(impl) == ("sdpa" if impl == "auto" else impl)


def test_machine_checks_are_skipped_for_another_machine(machine):
    machine("absent", False)  # e.g. a memory estimate of a GPU recipe on a login node
    assert load_recipe(DEMO, FORCE_FLASH, check_paths=False).student.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("recipe", sorted(DEMO.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_recipe_needs_flash_attn(machine, recipe):
    machine("absent", False)
    validate_attention(load_recipe(recipe, check_paths=False))


def test_auto_attention_of_an_fp32_run_is_sdpa_even_with_flash_attention(monkeypatch):
    from bld_scale.config import recipe_from_dict
    from bld_scale.train import setup

    import bld_scale.parallel.engines as engines

    recipe = recipe_from_dict({"train": {"precision": "fp32"}})
    assert setup.student_attention(recipe) == "sdpa"
    monkeypatch.setattr(engines, "resolve_precision", lambda name: "bf16")
    recipe = recipe_from_dict({"train": {"precision": "bf16"}})
    assert setup.student_attention(recipe) == "auto"  # resolved later by pick_attn_implementation
