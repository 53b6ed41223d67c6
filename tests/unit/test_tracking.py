"""MetricsWriter: JSONL records, TensorBoard events cut back on resume (`purge_step`), and one line
when TensorBoard is asked for but cannot be imported."""
from __future__ import annotations

import json
import sys

import pytest

from bld_scale.train.tracking import MetricsWriter


def test_jsonl_records_have_step_and_kind(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    w.log(3, "train", {"loss": 1.5, "note": "x", "bad": float("nan")})
    w.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {"step": 3, "kind": "train", "loss": 1.5, "note": "x", "bad": "nan"}


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.log(1, "train", {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_purges_redone_steps_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 7):  # a run that got to step 6, last checkpoint at step 3
        first.log(step, "train", {"loss": 100.0 + step})
    first.close()
    resumed = MetricsWriter(tmp_path, enabled=True, purge_step=4)
    for step in range(4, 9):
        resumed.log(step, "train", {"loss": float(step)})
    resumed.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    # steps 4-6 of the first run are dropped: every step once, the resumed values after step 3
    assert events == [(1, 101.0), (2, 102.0), (3, 103.0), (4, 4.0), (5, 5.0), (6, 6.0), (7, 7.0), (8, 8.0)]


def test_missing_tensorboard_is_said_once_on_rank0(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    w.log(1, "train", {"loss": 2.0})
    w.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[bld_scale] TensorBoard off:") and "pip install tensorboard" in line
    assert "logging.tensorboard=false" in line
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "kind": "train", "loss": 2.0}
    # other ranks (enabled=False), and runs that did not ask for TensorBoard, say nothing
    MetricsWriter(tmp_path / "rank1", enabled=False, tensorboard=True).close()
    MetricsWriter(tmp_path / "off", enabled=True, tensorboard=False).close()
    assert capsys.readouterr().out == ""
