"""The training loop's state (step, data position, log window, evaluations, RNG) round trips
exactly, by itself and through the checkpoint manager, in the current and the previous format.

One process, no DeepSpeed: the manager is driven with a stand-in engine that keeps one tensor
(the manager only calls its save_checkpoint / load_checkpoint).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from old_checkpoints import as_format_1

from bld_scale.checkpoint import CheckpointManager, read_meta
from bld_scale.data.sources import WindowStream
from bld_scale.train.state import LogWindow, TrainState

TEXTS = [("To be, or not to be, that is the question. " * 30)[: 900 + 37 * i] for i in range(12)]
EVALS = {"teacher": {"teacher_token_bpb": 2.5, "teacher_byte_bpb": 2.6, "conversion_gap": 0.1,
                     "conversion": "cover"}, "student_bpb": 7.25}


def one_rank_sum(values):
    return [float(v) for v in values]


def _logs(i: int) -> dict:
    return {"loss": 1.0 + 0.25 * i, "loss_ce": 0.5 * i, "tokens": 100.0 + i, "bytes": 400.0 + i}


def _state(rank: int = 0) -> TrainState:
    return TrainState(WindowStream(TEXTS, 256, seed=5), rank, one_rank_sum)


def _midway() -> TrainState:
    """Three steps in: windows taken, two micro-batches in the open log window, evaluations done."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = _state()
    state.evals_before = dict(EVALS)
    for step in (1, 2, 3):
        state.stream.take(4)
        state.step = step
    state.window.add(_logs(1))
    state.window.add(_logs(2))
    random.random(), np.random.rand(), torch.rand(2)  # the generators moved on since seeding
    return state


def _go_on(state: TrainState) -> dict:
    """What the loop would see next: windows, random draws, the next record's averages."""
    windows = state.stream.take(8)
    draws = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    state.window.add(_logs(3))
    record = state.window.close(one_rank_sum)
    averages = {k: v for k, v in record.items() if not k.endswith("_per_s")}
    return {"windows": windows, "draws": draws, "averages": averages, "step": state.step,
            "evals": state.evals_before, "position": state.stream.position}


def _as_saved(state_dict: dict) -> dict:
    """Through JSON as meta.json keeps it (the RNG goes to a torch file as it is)."""
    rest = {k: v for k, v in state_dict.items() if k != "rng"}
    return {**json.loads(json.dumps(rest)), "rng": state_dict["rng"]}


def test_the_log_window_averages_per_micro_batch_and_counts_throughput():
    window = LogWindow()
    window.begin()
    window.add(_logs(1))
    window.add(_logs(3))
    record = window.close(one_rank_sum)
    assert record["loss"] == pytest.approx((1.25 + 1.75) / 2)
    assert record["loss_ce"] == pytest.approx((0.5 + 1.5) / 2)
    assert "tokens" not in record and "_micro" not in record
    assert record["tokens_per_s"] > 0 and record["bytes_per_s"] / record["tokens_per_s"] == pytest.approx(804 / 204)
    assert window.sums == {}  # the next window starts empty
    assert "teacher_tokens_per_s" not in record  # only where the loop counts teacher positions


def test_teacher_tokens_are_a_count_like_tokens():
    """The pipeline adds each micro-batch's teacher positions (for the MFU): summed, a rate per second."""
    window = LogWindow()
    window.begin()
    window.add({**_logs(1), "teacher_tokens": 120.0})
    window.add({**_logs(3), "teacher_tokens": 130.0})
    record = window.close(one_rank_sum)
    assert "teacher_tokens" not in record
    assert record["teacher_tokens_per_s"] / record["tokens_per_s"] == pytest.approx(250 / 204)


class _NoHostRead(torch.Tensor):
    """A device value that fails if anything reads it on the host (what a sync would be on a GPU)."""

    def __float__(self):
        raise AssertionError("a log value was read on the host during the step")

    def item(self):
        raise AssertionError("a log value was read on the host during the step")


def test_the_log_window_reads_tensors_only_when_a_record_is_made():
    """Micro-batch logs stay tensors, summed in float64 where they are; `close` reads them once.
    The sums equal those of the same values read one by one as Python floats."""
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1.3, 2.7)]
    window = LogWindow()
    window.begin()
    for v in values:
        window.add({"loss": v.as_subclass(_NoHostRead), "tokens": torch.tensor(7)})
    assert isinstance(window.sums["loss"], torch.Tensor)
    window.sums = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v)
                   for k, v in window.sums.items()}
    record = window.close(one_rank_sum)
    assert record["loss"] == sum(float(v) for v in values) / 3  # float64 sums in the same order: equal
    assert record["tokens_per_s"] > 0


def test_state_round_trip_continues_exactly():
    original = _midway()
    saved = _as_saved(original.state_dict())
    assert saved["step"] == 3 and saved["data"]["position"] == 12
    assert saved["log_sums"] == {"_micro": 2.0, "loss": 2.75, "loss_ce": 1.5, "tokens": 203.0, "bytes": 803.0}
    expected = _go_on(original)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process: other states
    restored = _state()
    restored.load_state_dict(saved)
    restored.window.begin()
    assert _go_on(restored) == expected


def test_the_saved_log_sums_are_carried_by_rank_zero_only():
    saved = _as_saved(_midway().state_dict())
    other = _state(rank=1)
    other.load_state_dict(saved)
    assert other.window.sums == {k: 0.0 for k in saved["log_sums"]}  # same keys: the all-reduce lines up
    assert other.step == 3 and other.stream.position == 12 and other.evals_before == EVALS


class TinyEngine:
    """Stands in for a DeepSpeed engine's save_checkpoint / load_checkpoint: one tensor per tag."""

    def __init__(self, value: float):
        self.weight = torch.tensor([value])

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight, "client": client_state}, folder / "state.pt")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        path = Path(load_dir) / tag / "state.pt"
        if not path.is_file():
            return None, None
        saved = torch.load(path)
        self.weight = saved["weight"]
        return str(path), saved["client"]


RUN = {"identity": {"teacher": {"path": "/t", "fingerprint": "f" * 16}}, "recipe": {"train": {"max_steps": 8}},
       "student_parameters": 1234, "metrics_bytes": 77}


def _save(root: Path, state: TrainState, keep: int = 2) -> Path:
    manager = CheckpointManager(root, rank=0, world=1, keep=keep, interval=3)
    written = []
    folder = manager.save(state.step, TinyEngine(float(state.step)), state, RUN,
                          write_student_files=lambda f: (f.mkdir(parents=True), written.append(f.name)))
    assert written == ["student"] and manager.last_saved == state.step
    return folder


def test_the_manager_saves_the_state_atomically_and_loads_it_back(tmp_path):
    original = _midway()
    folder = _save(tmp_path, original)
    assert folder == tmp_path / "step-3" and (tmp_path / "latest").read_text() == "step-3\n"
    assert sorted(p.name for p in folder.iterdir()) == ["ds", "manifest.json", "meta.json", "rng", "student"]
    assert [p.name for p in (folder / "rng").iterdir()] == ["rank-00000.pt"]
    assert not list(tmp_path.glob("tmp-*"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == 2 and meta["step"] == 3 and meta["world_size"] == 1
    assert meta["train_state"]["data"]["position"] == 12 and "rng" not in meta["train_state"]
    assert meta["run"] == RUN
    expected = _go_on(original)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    manager = CheckpointManager(tmp_path, rank=0, world=1, keep=2, interval=3)
    engine, restored = TinyEngine(-1.0), _state()
    assert manager.load(manager.latest(), engine, restored) == "rank-00000.pt"
    assert engine.weight.item() == 3.0 and manager.last_saved == 3
    restored.window.begin()
    assert _go_on(restored) == expected


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    state = _state()
    for step in (3, 6, 8):
        state.step = step
        state.evals_before = dict(EVALS)
        _save(tmp_path, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-6", "step-8"]


def test_a_format_1_checkpoint_loads_as_the_same_state(tmp_path):
    original = _midway()
    folder = _save(tmp_path, original)
    current = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(as_format_1(current)))
    current.pop("manifest")  # format 1 had no manifest
    assert read_meta(folder) == current  # converted to the layout this version writes
    expected = _go_on(original)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restored = _state()
    CheckpointManager(tmp_path, rank=0, world=1).load(folder, TinyEngine(0.0), restored)
    restored.window.begin()
    assert _go_on(restored) == expected
