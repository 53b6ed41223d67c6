"""The run directory policy (resume / fresh / refuse) on real folders; no ranks, no DeepSpeed.

Checkpoints here are step folders holding meta.json, fake shards (random bytes) and the manifest
a save writes: the policy reads meta.json, and verifies the files against the manifest.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from bld_scale.checkpoint import CheckpointManager, ResumeError, cut_metrics, prepare_run_directory
from bld_scale.checkpoint.manifest import checkpoint_files, hash_files, write_manifest
from bld_scale.checkpoint.meta import compose_meta
from bld_scale.checkpoint.run_directory import carry_out, decide

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 8


@pytest.fixture(scope="module")
def identity():
    from fake_checkpoints import demo_identity

    return demo_identity()


def _record(step: int, kind: str = "train") -> str:
    return json.dumps({"step": step, "kind": kind, "loss": 1.0}) + "\n"


def _checkpoint(out: Path, step: int, identity: dict, metrics_bytes: int, point_latest: bool = True) -> Path:
    folder = out / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    state = {"step": step, "data": {"position": 4 * step}, "log_sums": {}, "log_window_seconds": 0.0,
             "evals_before": {"teacher": None, "student_bpb": None}}
    run = {"identity": identity, "recipe": {}, "student_parameters": 1, "metrics_bytes": metrics_bytes}
    (folder / "meta.json").write_text(json.dumps(compose_meta(step, 2, state, run)))
    (folder / "ds").mkdir()
    for rank in range(2):
        (folder / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(3000 + step))
    write_manifest(folder, hash_files(folder, checkpoint_files(folder)))
    if point_latest:
        (out / "checkpoints" / "latest").write_text(f"step-{step}\n")
    return folder


def _manager(out: Path) -> CheckpointManager:
    return CheckpointManager(out / "checkpoints", rank=0, world=1, keep=2, interval=3)


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}


def _prepare(out: Path, identity: dict, fresh: bool = False):
    return prepare_run_directory(out, _manager(out), identity, MAX_STEPS, fresh, rank=0, world=1)


# ------------------------------------------------------------------------------------ start
def test_an_empty_folder_starts_at_step_zero(tmp_path, identity):
    plan = decide(tmp_path, _manager(tmp_path), identity, MAX_STEPS, fresh=False)
    assert plan.resume_from is None and not plan.discard_checkpoints
    assert _prepare(tmp_path, identity) is None


def test_records_of_an_attempt_that_died_before_its_first_step_are_dropped(tmp_path, identity):
    (tmp_path / "metrics.jsonl").write_text(_record(0, "teacher_eval") + _record(0, "eval"))
    assert _prepare(tmp_path, identity) is None
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------ resume
def test_a_checkpoint_is_resumed_and_metrics_cut_back_to_its_length_once_loaded(tmp_path, identity):
    kept = _record(0, "eval") + _record(1) + _record(2) + _record(3)
    later = _record(4) + _record(5)  # 4, 5 ran after the save
    (tmp_path / "metrics.jsonl").write_text(kept + later)
    step3 = _checkpoint(tmp_path, 3, identity, metrics_bytes=len(kept.encode()))
    (tmp_path / "checkpoints" / "tmp-step-6").mkdir()  # a save that crashed
    assert _prepare(tmp_path, identity) == step3
    assert not (tmp_path / "checkpoints" / "tmp-step-6").exists()
    assert step3.is_dir()
    # not cut yet: a load that fails must not lose records (the pipeline cuts after loading)
    assert (tmp_path / "metrics.jsonl").read_text() == kept + later
    cut_metrics(tmp_path, len(kept.encode()))
    assert (tmp_path / "metrics.jsonl").read_text() == kept


def test_latest_names_the_checkpoint_not_the_highest_step(tmp_path, identity):
    _checkpoint(tmp_path, 6, identity, 0)
    step3 = _checkpoint(tmp_path, 3, identity, 0)  # e.g. pointed back by hand
    assert decide(tmp_path, _manager(tmp_path), identity, MAX_STEPS, fresh=False).resume_from == step3


def test_a_moved_teacher_with_the_same_content_is_resumed(tmp_path, identity):
    saved = copy.deepcopy(identity)
    saved["teacher"]["path"] = "/elsewhere/teacher"
    step3 = _checkpoint(tmp_path, 3, saved, 0)
    assert _prepare(tmp_path, identity) == step3


# ------------------------------------------------------------------------------------ refuse
def test_a_run_without_a_checkpoint_is_refused_and_left_as_it_was(tmp_path, identity):
    (tmp_path / "metrics.jsonl").write_text(_record(0, "eval") + _record(1))
    (tmp_path / "checkpoints" / "tmp-step-3").mkdir(parents=True)
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeError, match="--fresh"):
        _prepare(tmp_path, identity)
    assert _snapshot(tmp_path) == before


def test_another_student_or_data_order_is_refused_naming_each_difference(tmp_path, identity):
    saved = copy.deepcopy(identity)
    saved["student_model"]["K"] = identity["student_model"]["K"] + 1
    saved["student_tokenizer"]["fingerprint"] = "0" * 16
    saved["data"]["seed"] = identity["data"]["seed"] + 1
    _checkpoint(tmp_path, 3, saved, metrics_bytes=0)
    (tmp_path / "metrics.jsonl").write_text(_record(1) + _record(2) + _record(3))
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeError) as err:
        _prepare(tmp_path, identity)
    message = str(err.value)
    assert f"K: {saved['student_model']['K']} -> {identity['student_model']['K']}" in message
    assert "student tokenizer (student.tokenizer)" in message and "data (seed" in message
    assert "--fresh" in message
    assert _snapshot(tmp_path) == before  # metrics.jsonl not cut: the decision was not final


def test_a_checkpoint_past_max_steps_is_refused(tmp_path, identity):
    _checkpoint(tmp_path, MAX_STEPS + 1, identity, 0)
    with pytest.raises(ResumeError, match=f"past train.max_steps={MAX_STEPS}"):
        _prepare(tmp_path, identity)


def test_latest_naming_a_missing_folder_is_refused(tmp_path, identity):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-9\n")
    with pytest.raises(ResumeError, match="step-9, which is missing"):
        _prepare(tmp_path, identity)


def test_a_checkpoint_of_an_unknown_format_is_refused_saying_what_to_do(tmp_path, identity):
    step3 = _checkpoint(tmp_path, 3, identity, 0)
    meta = json.loads((step3 / "meta.json").read_text())
    (step3 / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    write_manifest(step3, hash_files(step3, checkpoint_files(step3)))  # whole, as its writer left it
    with pytest.raises(ResumeError) as err:
        _prepare(tmp_path, identity)
    assert "format 99" in str(err.value) and "--fresh" in str(err.value) and "version" in str(err.value)


# ------------------------------------------------------------------------------------ fresh
def test_fresh_discards_the_run_and_its_checkpoints(tmp_path, identity):
    _checkpoint(tmp_path, 3, identity, 0)
    (tmp_path / "checkpoints" / "step-99").mkdir()  # not even a complete checkpoint
    (tmp_path / "checkpoints" / "tmp-step-6").mkdir()
    for name in ("metrics.jsonl", "summary.json"):
        (tmp_path / name).write_text(_record(1))
    for name in ("final", "tensorboard"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    (tmp_path / "recipe.resolved.yaml").write_text("seed: 1\n")  # rewritten by every run: kept
    assert _prepare(tmp_path, identity, fresh=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "recipe.resolved.yaml"]
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_fresh_ignores_a_checkpoint_it_could_not_resume(tmp_path, identity):
    step3 = _checkpoint(tmp_path, 3, identity, 0)
    (step3 / "meta.json").write_text("{}")
    plan = decide(tmp_path, _manager(tmp_path), identity, MAX_STEPS, fresh=True)
    carry_out(plan, tmp_path, _manager(tmp_path))
    assert not step3.exists()


# ------------------------------------------------------------------------------------ when to save
@pytest.mark.parametrize("interval, step, stopping, end, last_saved, due", [
    (3, 3, False, False, None, True),    # the interval's multiples
    (3, 4, False, False, 3, False),
    (3, 4, True, False, 3, True),        # a stop request always saves
    (0, 4, True, False, None, True),     # even with periodic saves off
    (0, 6, False, False, None, False),
    (0, 8, False, True, None, False),    # no end save without an interval
    (3, 8, False, True, 6, True),        # the end, not saved yet
    (3, 6, False, True, 6, False),       # the end fell on a multiple: saved already
])
def test_the_manager_decides_when_to_save(tmp_path, interval, step, stopping, end, last_saved, due):
    manager = CheckpointManager(tmp_path, rank=0, world=1, keep=2, interval=interval)
    manager.last_saved = last_saved
    assert manager.due(step, stopping=stopping, end=end) is due
