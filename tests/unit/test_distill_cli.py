"""launch/distill.py's command line: --help lists every recipe key, --print-recipe prints the
resolved recipe without loading models. Run as a subprocess, the way a user runs it."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from bld_scale.config import Recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "launch" / "distill.py"
DEMO = REPO / "launch" / "recipes" / "demo.yaml"


def _distill(*args: str, cwd: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(REPO)])}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(DISTILL), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _leaf_fields(cls=Recipe, prefix=""):
    """(dotted key, field, default value) of every recipe key, read from the dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield prefix + f.name, f, default


def _as_written(value) -> str:
    """A default as a recipe would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == []:
        return "[]"
    return str(value)


def test_help_lists_every_key_with_type_default_and_meaning(tmp_path):
    proc = _distill("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    keys = list(_leaf_fields())
    assert len(keys) > 40
    for key, f, default in keys:
        help_text = f.metadata.get("help", "")
        assert help_text.strip(), f"{key}: no help text; give it metadata help in bld_scale/config/schema.py"
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  {key} (")]
        assert lines[at].endswith(f"; default {_as_written(default)})"), (key, lines[at])
        assert lines[at + 1].strip() == help_text, key
    assert "  train.lr (float; default 0.0003)" in lines
    assert "  student.attn_implementation (one of auto, sdpa, eager, flash_attention_2; default auto)" in lines
    for flag in ("--config", "--fresh", "--print-recipe"):
        assert flag in proc.stdout


def test_print_recipe_reloads_to_the_same_recipe_without_loading_models(tmp_path, monkeypatch):
    # Models would need transformers (and DeepSpeed): make both unimportable in the child.
    blocked = tmp_path / "blocked"
    for name in ("transformers", "deepspeed"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} imported by --print-recipe')\n")
    overrides = ["train.lr=2e-4", "student.K=4", "output_dir=out"]
    proc = _distill("--print-recipe", "--config", str(DEMO), *overrides, cwd=tmp_path, pythonpath=[blocked])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the demo recipe runs here: nothing to note
    monkeypatch.chdir(tmp_path)
    expected = load_recipe(DEMO, overrides)
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert recipe_from_dict(yaml.safe_load(proc.stdout)) == expected
    assert load_recipe(printed) == expected
    assert expected.output_dir == str(tmp_path / "out") and expected.train.lr == 2e-4


def test_print_recipe_notes_what_this_machine_lacks(tmp_path):
    proc = _distill("--print-recipe", "--config", str(DEMO), "teacher.path=/nonexistent/teacher", cwd=tmp_path)
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["teacher"]["path"] == "/nonexistent/teacher"
    assert "would not run on this machine: teacher.path: path does not exist" in proc.stderr


def test_print_recipe_still_refuses_a_bad_recipe(tmp_path):
    proc = _distill("--print-recipe", "train.lrr=1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown key 'train.lrr'" in proc.stderr
