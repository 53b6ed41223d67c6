"""Checkpoints that verify on their own (manifest: sizes + SHA-256), and what a resume does with a
damaged one or a missing `latest`; no ranks, no DeepSpeed.

Checkpoints here are made by the real `CheckpointManager.save` (one rank) with a stand-in engine
that writes fake shards (tests/fake_checkpoints.py); the checksums are checked against hashlib on
the bytes read back, not against the code under test.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from bld_scale.checkpoint import (DamagedCheckpointError, ResumeError, cut_metrics, prepare_run_directory, read_meta,
                                  verify_checkpoint)
from bld_scale.checkpoint.manifest import owner
from bld_scale.checkpoint.rank_verification import RankVerification
from fake_checkpoints import SHARD, flip_middle_byte as _flip_middle_byte, manager as _manager, save_fake, truncate as _truncate

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 20


@pytest.fixture(scope="module")
def identity():
    from fake_checkpoints import demo_identity

    return demo_identity()


def _save(out: Path, step: int, identity: dict, metrics_bytes: int = 0) -> Path:
    return save_fake(out, step, identity, metrics_bytes, MAX_STEPS)


def _run(out: Path, steps=(3, 6)) -> dict:
    """A run folder: checkpoints at `steps` (latest: the last), metrics.jsonl with records up to 8."""
    lines = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) + "\n" for s in range(1, 9)]
    folders = {}
    for step in steps:
        folders[step] = _save(out, step, run_identity_of(out), len("".join(lines[:step]).encode()))
    (out / "metrics.jsonl").write_text("".join(lines) + json.dumps({"step": 8, "kind": "summary"}) + "\n")
    return folders


def run_identity_of(out: Path) -> dict:
    return json.loads((out / "identity.json").read_text())


def _prepare(out: Path, identity: dict, notes: list | None = None):
    return prepare_run_directory(out, _manager(out), identity, MAX_STEPS, False, rank=0, world=1,
                                 log=(notes if notes is not None else []).append)


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}


@pytest.fixture
def run_dir(tmp_path, identity):
    (tmp_path / "identity.json").write_text(json.dumps(identity))
    return tmp_path


# ------------------------------------------------------------------------------------ the manifest
def test_a_save_writes_a_manifest_of_every_file_with_its_size_and_sha256(run_dir, identity):
    folder = _save(run_dir, 3, identity)
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert {"meta.json", SHARD, "rng/rank-00000.pt", "student/config.json", "zero_to_fp32.py"} <= set(manifest["files"])
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert read_meta(folder)["manifest"] == "manifest.json"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-3\n"
    assert not list((run_dir / "checkpoints").glob("tmp-*"))
    assert verify_checkpoint(folder).ok


@pytest.mark.parametrize("name, world, rank", [
    ("ds/zero_pp_rank_3_mp_rank_00_optim_states.pt", 8, 3),
    ("ds/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", 16, 12),
    ("ds/zero_pp_rank_3_mp_rank_00_model_states.pt", 2, 1),  # saved by more ranks than this run has
    ("rng/rank-00005.pt", 8, 5),
    ("meta.json", 8, 0), ("zero_to_fp32.py", 8, 0), ("student/tokenizer.json", 8, 0),
])
def test_each_rank_hashes_the_files_it_wrote(name, world, rank):
    assert owner(name, world) == rank


# ------------------------------------------------------------------------------------ verification
@pytest.mark.parametrize("damage, expected", [
    (lambda f: _truncate(f / SHARD), f"{SHARD}: 100 bytes, the manifest says 5000 (truncated)"),
    (lambda f: _flip_middle_byte(f / SHARD), f"{SHARD}: content differs from the manifest"),
    (lambda f: (f / SHARD).unlink(), f"{SHARD}: missing"),
    (lambda f: _truncate(f / "meta.json"), "meta.json: 100 bytes, the manifest says"),
    (lambda f: _truncate(f / "manifest.json"), "manifest.json: not valid JSON"),
    (lambda f: (f / "manifest.json").unlink(), "manifest.json: missing (its meta.json says one was written)"),
    (lambda f: (f / "meta.json").write_bytes(b"\xff\xfe" + os.urandom(50)), "meta.json: "),
])
def test_damage_is_named_by_file_and_problem(run_dir, identity, damage, expected):
    folder = _save(run_dir, 3, identity)
    damage(folder)
    verdict = verify_checkpoint(folder)
    assert not verdict.ok
    assert any(p.startswith(expected) for p in verdict.problems), verdict.problems


def test_the_rank_split_hasher_finds_what_one_process_finds(run_dir, identity):
    folder = _save(run_dir, 3, identity)
    _flip_middle_byte(folder / SHARD)
    verdict = verify_checkpoint(folder, RankVerification(0, 1).hasher)
    assert [p.split(" (")[0] for p in verdict.problems] == [f"{SHARD}: content differs from the manifest"]


def test_a_checkpoint_saved_before_manifests_is_checked_for_whole_archives(run_dir, identity):
    import torch

    folder = _save(run_dir, 3, identity)
    (folder / "manifest.json").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    del meta["manifest"]  # as bld_scale wrote meta.json before manifests
    (folder / "meta.json").write_text(json.dumps(meta))
    for shard in (folder / "ds").iterdir():  # real torch archives, as DeepSpeed writes
        torch.save({"weights": torch.arange(2000.0)}, shard)
    verdict = verify_checkpoint(folder)
    assert verdict.ok and "no manifest.json" in verdict.checked
    _truncate(folder / SHARD, 4096)
    assert verify_checkpoint(folder).problems == [f"{SHARD}: not a whole torch archive (4096 bytes; truncated or "
                                                  "damaged)"]


@pytest.mark.parametrize("text, expected", [
    (b"", "not valid JSON"),
    (b"\x80\x81garbage", "not valid JSON ('utf-8' codec can't decode"),
    (b"{}", 'no "format" key'),
    (b"[1, 2]", 'no "format" key'),
    (json.dumps({"format": 2, "world_size": 2, "train_state": {"data": {}}, "run": {}}).encode(), 'key "step" is missing'),
    (json.dumps({"format": 2, "step": 3, "world_size": 2, "train_state": "x", "run": {}}).encode(),
     'key "train_state" should be dict, found str'),
])
def test_a_damaged_meta_json_is_named_with_its_problem(tmp_path, text, expected):
    (tmp_path / "meta.json").write_bytes(text)
    with pytest.raises(DamagedCheckpointError) as err:
        read_meta(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "meta.json")) and expected in str(err.value)


# ------------------------------------------------------------------------------------ which checkpoint a resume loads
def test_a_deleted_latest_resumes_the_newest_checkpoint_that_verifies(run_dir, identity):
    folders = _run(run_dir)
    (run_dir / "checkpoints" / "latest").unlink()
    notes = []
    assert _prepare(run_dir, identity, notes) == folders[6]
    assert "checkpoints/latest is missing (step folders: step-3, step-6)" in notes[0]
    assert "Resuming from step-6, the newest checkpoint that verifies" in notes[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-6\n"


@pytest.mark.parametrize("damage", [lambda f: _truncate(f / SHARD), lambda f: _truncate(f / "meta.json", 40),
                                    lambda f: _flip_middle_byte(f / SHARD)])
def test_a_damaged_latest_falls_back_to_the_previous_checkpoint(run_dir, identity, damage):
    folders = _run(run_dir)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    damage(folders[6])
    notes = []
    assert _prepare(run_dir, identity, notes) == folders[3]
    assert f"checkpoint {folders[6]} is damaged: " in notes[0]
    assert "Resuming from step-3, the newest earlier checkpoint that verifies; step-6 is moved aside to step-6.bad" in notes[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-3\n"
    assert (run_dir / "checkpoints" / "step-6.bad" / "ds").is_dir() and not folders[6].exists()
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # cut only once the checkpoint has loaded
    cut_metrics(run_dir, read_meta(folders[3])["run"]["metrics_bytes"])
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_checkpoint_set_aside_again_replaces_the_older_one(run_dir, identity):
    folders = _run(run_dir)
    _truncate(folders[6] / SHARD)
    _prepare(run_dir, identity)
    assert _save(run_dir, 6, identity) == folders[6]  # the resumed run saves step 6 again: whole
    assert _prepare(run_dir, identity) == folders[6]
    _flip_middle_byte(folders[6] / SHARD)
    assert _prepare(run_dir, identity) == folders[3]
    bad = run_dir / "checkpoints" / "step-6.bad"
    assert (bad / SHARD).stat().st_size == 5000  # the second damaged copy, not the truncated first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-3", "step-6.bad"]


def test_latest_naming_a_missing_folder_resumes_the_newest_earlier_one(run_dir, identity):
    folders = _run(run_dir, steps=(3, 6))
    (run_dir / "checkpoints" / "latest").write_text("step-9\n")
    notes = []
    assert _prepare(run_dir, identity, notes) == folders[6]
    assert "latest names step-9, which is missing" in notes[0]


def test_a_fallback_never_goes_past_the_step_latest_names(run_dir, identity):
    """`latest` pointed back by hand at a damaged step-3: step-6 is newer, not a fallback."""
    folders = _run(run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step-3\n")
    _truncate(folders[3] / SHARD)
    before = _snapshot(run_dir)
    with pytest.raises(ResumeError) as err:
        _prepare(run_dir, identity)
    assert f"step-3: {SHARD}: 100 bytes, the manifest says 5000 (truncated)" in str(err.value)
    assert _snapshot(run_dir) == before


def test_when_no_checkpoint_verifies_the_run_is_refused_naming_each_and_nothing_changes(run_dir, identity):
    folders = _run(run_dir)
    _truncate(folders[6] / SHARD)
    (folders[3] / "meta.json").write_text("{")
    before = _snapshot(run_dir)
    with pytest.raises(ResumeError) as err:
        _prepare(run_dir, identity)
    message = str(err.value)
    assert f"step-6: {SHARD}: 100 bytes, the manifest says 5000 (truncated)" in message
    assert "step-3: meta.json: 1 bytes, the manifest says" in message
    assert "--fresh" in message
    assert _snapshot(run_dir) == before


def test_a_fallback_with_another_teacher_is_refused_and_nothing_changes(run_dir, identity):
    folders = _run(run_dir)
    _truncate(folders[6] / SHARD)
    other = json.loads(json.dumps(identity))
    other["teacher"]["fingerprint"] = "0" * 16
    before = _snapshot(run_dir)
    with pytest.raises(ResumeError, match="teacher"):
        _prepare(run_dir, other)
    assert _snapshot(run_dir) == before


def test_a_whole_latest_is_resumed_and_the_log_says_what_was_verified(run_dir, identity):
    folders = _run(run_dir)
    notes = []
    assert _prepare(run_dir, identity, notes) == folders[6]
    assert notes == [notes[0]] and notes[0].startswith("checkpoint step-6 verified (8 files, ")
    assert "sha256 in" in notes[0]
