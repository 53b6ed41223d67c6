"""tools/inspect_checkpoint.py and tools/export_hf.py on damaged input: they verify the checkpoint
first and refuse it in one line `bld_scale: ...` naming the file and the problem, exit status 2,
no traceback. Fake checkpoints (tests/fake_checkpoints.py): the refusals come before any shard
is read as tensors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bld_scale.checkpoint.manifest import checkpoint_files, hash_files, write_manifest
from fake_checkpoints import SHARD, flip_middle_byte, save_fake, truncate

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import export_hf  # noqa: E402
import inspect_checkpoint  # noqa: E402

IDENTITY = {"teacher": {"path": "/models/teacher", "fingerprint": "0123456789abcdef", "fingerprint_rule": 2}}


@pytest.fixture
def step3(tmp_path) -> Path:
    return save_fake(tmp_path, 3, IDENTITY)


def _reseal(folder: Path) -> None:
    """Rewrite the manifest, as if the damage had been there when the checkpoint was saved."""
    write_manifest(folder, hash_files(folder, checkpoint_files(folder)))


def _drop_manifest(folder: Path) -> None:
    """Make it a checkpoint as saved before manifests (meta.json without its "manifest" key)."""
    (folder / "manifest.json").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("manifest", None)
    (folder / "meta.json").write_text(json.dumps(meta))


def _refused(tool, argv: list[str], capsys) -> str:
    assert tool.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bld_scale: "), captured.err
    return lines[0]


def test_inspect_reports_a_whole_checkpoint_and_what_it_verified(step3, capsys):
    assert inspect_checkpoint.main([str(step3)]) == 0
    out = capsys.readouterr().out
    assert "step         3 of 20" in out and "verified     8 files, 0.0 MB, sha256 in" in out
    assert "fingerprint 0123456789abcdef" in out


def test_inspect_names_a_truncated_shard(step3, capsys):
    truncate(step3 / SHARD)
    line = _refused(inspect_checkpoint, [str(step3)], capsys)
    assert line == f"bld_scale: checkpoint {step3} is damaged: {SHARD}: 100 bytes, the manifest says 5000 (truncated)"


def test_inspect_sizes_only_checks_sizes_and_the_default_checks_contents(step3, capsys):
    flip_middle_byte(step3 / SHARD)
    assert inspect_checkpoint.main([str(step3), "--sizes-only"]) == 0
    assert "sizes only" in capsys.readouterr().out
    line = _refused(inspect_checkpoint, [str(step3)], capsys)
    assert f"{SHARD}: content differs from the manifest (sha256 " in line


@pytest.mark.parametrize("meta, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "meta.json: not valid JSON ('utf-8' codec can't decode byte 0x89"),
    (json.dumps({"format": 2, "world_size": 2, "train_state": {"data": {}}, "run": {}}).encode(),
     'meta.json: key "step" is missing'),
    (json.dumps({"format": 2, "step": 3, "world_size": 2, "train_state": {"data": 7}, "run": {}}).encode(),
     'meta.json (train_state): key "data" should be dict, found int 7'),
    (b"{}", 'meta.json: not a bld_scale checkpoint\'s meta.json (no "format" key)'),
])
@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "older checkpoint"])
def test_inspect_names_a_garbage_meta_json(step3, capsys, meta, expected, with_manifest):
    if not with_manifest:
        _drop_manifest(step3)
    (step3 / "meta.json").write_bytes(meta)
    if with_manifest:
        _reseal(step3)  # the manifest agrees: only reading meta.json can tell
    line = _refused(inspect_checkpoint, [str(step3)], capsys)
    assert line.startswith(f"bld_scale: checkpoint {step3} is damaged: {expected}"), line


def test_inspect_names_a_meta_json_that_differs_from_the_manifest(step3, capsys):
    (step3 / "meta.json").write_text("{}")
    line = _refused(inspect_checkpoint, [str(step3)], capsys)
    assert "meta.json: 2 bytes, the manifest says" in line


def test_inspect_on_a_run_without_latest_lists_the_step_folders(step3, capsys):
    (step3.parent / "latest").unlink()
    line = _refused(inspect_checkpoint, [str(step3.parent.parent)], capsys)
    assert "checkpoints/latest is missing; pass one of the step folders instead (step-3)" in line


def test_export_names_a_truncated_shard_before_any_work(step3, tmp_path, capsys):
    truncate(step3 / SHARD)
    line = _refused(export_hf, [str(step3), str(tmp_path / "hf")], capsys)
    assert line == f"bld_scale: checkpoint {step3} is damaged: {SHARD}: 100 bytes, the manifest says 5000 (truncated)"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "older checkpoint"])
def test_export_names_an_empty_meta_json(step3, tmp_path, capsys, with_manifest):
    if not with_manifest:
        _drop_manifest(step3)
    (step3 / "meta.json").write_text("{}")
    if with_manifest:
        _reseal(step3)
    line = _refused(export_hf, [str(step3), str(tmp_path / "hf")], capsys)
    assert "meta.json: not a bld_scale checkpoint's meta.json (no \"format\" key)" in line


def test_export_names_a_truncated_shard_of_an_older_checkpoint(step3, tmp_path, capsys):
    import torch

    _drop_manifest(step3)
    for shard in (step3 / "ds").iterdir():
        torch.save({"w": torch.zeros(100)}, shard)
    truncate(step3 / SHARD, 300)
    line = _refused(export_hf, [str(step3), str(tmp_path / "hf")], capsys)
    assert f"{SHARD}: not a whole torch archive (300 bytes; truncated or damaged)" in line


def test_the_command_line_exits_2_without_a_traceback(step3):
    truncate(step3 / SHARD)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_checkpoint.py"), str(step3)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("(truncated)") and len(proc.stderr.strip().splitlines()) == 1
