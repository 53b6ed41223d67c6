"""Hostile but realistic training data (issue 12): invalid UTF-8, JSONL rows without text, null
Parquet cells, corpora too small for a step or empty. Every file is written into tmp_path and read
by the real readers (Parquet through `datasets`); every refusal is a `DataError` naming the file,
the place and the recipe key that fixes it."""
from __future__ import annotations

import codecs
import json

import pytest

from bld_scale.config import DataConfig
from bld_scale.data.batch import split_windows
from bld_scale.data.errors import DataError
from bld_scale.data.sources import WindowStream, load_documents, open_corpus

# 3000 good bytes, then a lone 0xFF, an incomplete 3-byte sequence cut by ASCII, a real U+FFFD,
# and a truncated 4-byte sequence at the very end.
BAD_UTF8 = b"a" * 3000 + b"\xff ok \xe2\x82 x \xef\xbf\xbd y\n\xf0\x9f\x98"


def reference_decode(data: bytes) -> tuple[str, int]:
    """Python's own replacing decoder, counting the replacements it makes."""
    calls = []

    def count(err):
        calls.append(err.start)
        return "\ufffd", err.end

    codecs.register_error("test_data_faults_count", count)
    return data.decode("utf-8", "test_data_faults_count"), len(calls)


class Log(list):
    def __call__(self, message):
        self.append(message)


# ---------------------------------------------------------------------- invalid UTF-8
@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_utf8_in_a_text_file_names_file_and_offset(tmp_path, streaming):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    with pytest.raises(DataError) as err:
        list(load_documents([str(tmp_path / "*.txt")], "text", streaming=streaming, log=None))
    message = str(err.value)
    assert "data.train" in message and str(tmp_path / "bad.txt") in message
    assert "byte 3000" in message and "line 1" in message and "ff" in message
    assert "data.invalid_utf8: replace" in message


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_utf8_replaced_and_counted_once(tmp_path, streaming):
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    expected, replaced = reference_decode(BAD_UTF8)
    assert replaced == 3 and expected.count("\ufffd") == 4  # the real U+FFFD is not counted
    log = Log()
    docs = load_documents([str(tmp_path / "bad.txt")], "text", streaming=streaming,
                          invalid_utf8="replace", log=log)
    assert list(docs) == [expected]
    assert list(docs) == [expected]  # a second pass (a second epoch) says nothing again
    assert log == [f"data.train: {tmp_path / 'bad.txt'}: read {replaced} invalid UTF-8 sequence(s) as "
                   "U+FFFD (first at byte 3000)"]


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_utf8_in_jsonl(tmp_path, streaming):
    lines = [b'{"text": "first"}\n', b'{"text": "caf\xe9 au lait"}\n']
    (tmp_path / "rows.jsonl").write_bytes(b"".join(lines))
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError) as err:
        list(load_documents([path], "jsonl", streaming=streaming, log=None))
    offset = len(lines[0]) + lines[1].index(b"\xe9")
    assert f"{path} is not valid UTF-8 at byte {offset} (line 2" in str(err.value)
    log = Log()
    docs = load_documents([path], "jsonl", streaming=streaming, invalid_utf8="replace", log=log)
    assert list(docs) == ["first", "caf\ufffd au lait"]
    assert log == [f"data.train: {path}: read 1 invalid UTF-8 sequence(s) as U+FFFD (first at byte {offset})"]


def test_unknown_invalid_utf8_policy_is_refused(tmp_path):
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    with pytest.raises(DataError, match="data.invalid_utf8"):
        load_documents([str(tmp_path / "bad.txt")], "text", invalid_utf8="ignore")


# ---------------------------------------------------------------------- rows without text
ROWS = [{"text": "one"}, {"body": "wrong field"}, {"text": None}, {"text": 5}, {"text": "two"},
        {"text": ["a", "list"]}, "a bare string", {"text": ""}]


def write_rows(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


@pytest.mark.parametrize("streaming", [False, True])
def test_jsonl_rows_without_text_are_counted_and_refused_past_the_limit(tmp_path, streaming):
    path = tmp_path / "rows.jsonl"
    write_rows(path, ROWS, ['{"text": "truncat'])
    with pytest.raises(DataError) as err:
        list(load_documents([str(path)], "jsonl", streaming=streaming, log=None))
    message = str(err.value)
    # 9 rows: 'one', 'two' and '' have text (an empty text is text); 6 have none
    assert "data.train: 6 of 9 lines (66.7%) have no usable text" in message
    assert "data.max_skipped_fraction=0.01" in message and str(path) in message
    assert "lines 2, 3, 4, 6, 7, ..." in message
    for reason in ("no field 'text': 1", "null: 1", "not a string (int): 1", "not a string (list): 1",
                   "not a JSON object: 1", "not valid JSON: 1"):
        assert reason in message


@pytest.mark.parametrize("streaming", [False, True])
def test_jsonl_rows_without_text_below_the_limit_are_reported_once(tmp_path, streaming):
    good = [{"text": f"row {i}"} for i in range(198)]
    write_rows(tmp_path / "a.jsonl", good[:99] + [{"text": None}])
    write_rows(tmp_path / "b.jsonl", good[99:] + [{"other": 1}])
    log = Log()
    docs = load_documents([str(tmp_path / "*.jsonl")], "jsonl", streaming=streaming, log=log)
    assert list(docs) == [r["text"] for r in good]
    assert list(docs) == [r["text"] for r in good]
    assert log == [f"data.train: {tmp_path / 'a.jsonl'}: skipped 1 of 100 lines without text (null: 1; lines 100)",
                   f"data.train: {tmp_path / 'b.jsonl'}: skipped 1 of 100 lines without text "
                   "(no field 'text': 1; lines 100)"]
    with pytest.raises(DataError, match=r"2 of 200 lines \(1.0%\).*max_skipped_fraction=0.005"):
        list(load_documents([str(tmp_path / "*.jsonl")], "jsonl", streaming=streaming,
                            max_skipped_fraction=0.005, log=None))


def test_a_streaming_corpus_is_judged_once_enough_rows_are_read(tmp_path):
    write_rows(tmp_path / "1.jsonl", [{"text": "x"}] * 980 + [{"text": None}] * 20)
    (tmp_path / "2.jsonl").write_bytes(b'{"text": "\xff"}\n')  # an error, if it were read
    with pytest.raises(DataError, match=r"20 of 1000 lines \(2.0%\)"):
        list(load_documents([str(tmp_path / "*.jsonl")], "jsonl", streaming=True, log=None))
    write_rows(tmp_path / "1.jsonl", [{"text": "x"}] * 99 + [{"text": None}])
    docs = load_documents([str(tmp_path / "*.jsonl")], "jsonl", streaming=True, log=None)
    with pytest.raises(DataError, match="not valid UTF-8"):  # 1 of 100 is not judged yet
        list(docs)
    with pytest.raises(DataError, match="'body' is not a column"):  # a wrong field: at once
        list(load_documents([str(tmp_path / "1.jsonl")], "jsonl", "body", streaming=True, log=None))


def test_loaded_jsonl_reads_rows_on_demand_in_any_order(tmp_path):
    rows = [{"text": f"doc {i} " + "é" * i} for i in range(50)]
    write_rows(tmp_path / "a.jsonl", rows[:20] + [{"text": None}])
    write_rows(tmp_path / "b.jsonl", rows[20:], ["", "   "])  # blank lines are no rows
    docs = load_documents([str(tmp_path / "*.jsonl")], "jsonl", max_skipped_fraction=0.1, log=None)
    assert len(docs) == 50
    for i in (49, 0, 20, 19, 33):
        assert docs[i] == rows[i]["text"]
    with pytest.raises(IndexError):
        docs[50]


@pytest.mark.parametrize("streaming", [False, True])
def test_null_parquet_cells_are_counted_per_file(tmp_path, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"text": ["d"] * 10 + [None]}), tmp_path / "2.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    files = [str(tmp_path / "1.parquet"), str(tmp_path / "2.parquet")]
    log = Log()
    docs = load_documents(files, "parquet", streaming=streaming, max_skipped_fraction=0.2, log=log)
    assert [d for d in docs if d is not None] == ["a", "c"] + ["d"] * 10
    list(docs)
    assert log == [f"data.train: {files[0]}: skipped 1 of 3 rows without text (null: 1; rows 2)",
                   f"data.train: {files[1]}: skipped 1 of 11 rows without text (null: 1; rows 11)"]
    with pytest.raises(DataError, match=r"have no usable text.*1.parquet"):
        list(load_documents(files, "parquet", streaming=streaming, log=None))
    with pytest.raises(DataError, match="holds int64 values, not text"):
        load_documents([str(tmp_path / "ints.parquet")], "parquet", streaming=streaming)


# ---------------------------------------------------------------------- small and empty corpora
def recipe_data(tmp_path, **kw) -> DataConfig:
    return DataConfig(train=[str(tmp_path / "*.txt")], **kw)


def test_empty_corpus_is_refused_up_front_naming_data_train(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"data.train holds no text.*\*\.txt"):
        open_corpus(recipe_data(tmp_path), log=None)
    with pytest.raises(DataError, match=r"data.train holds no text"):
        open_corpus(recipe_data(tmp_path, streaming=True), log=None)
    (tmp_path / "b.txt").write_text("now some text")
    corpus = open_corpus(recipe_data(tmp_path, streaming=True), log=None)
    assert list(corpus.train) == ["", "now some text"] and corpus.heldout == []


def test_jsonl_with_no_text_anywhere_is_refused(tmp_path):
    write_rows(tmp_path / "a.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(DataError, match="data.train holds no text"):
        open_corpus(DataConfig(train=[str(tmp_path / "a.jsonl")], format="jsonl"), log=None)


def test_empty_heldout_is_said(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "h.txt").write_text("")
    log = Log()
    corpus = open_corpus(DataConfig(train=[str(tmp_path / "a.txt")], heldout=[str(tmp_path / "h.txt")]), log=log)
    assert list(corpus.heldout) == [""]
    assert log == [f"data.heldout ({tmp_path / 'h.txt'}) holds no text: no held-out evaluation"]


def test_epochs_are_counted_and_said_once_each():
    docs = ["alpha beta gamma delta " * 3, "epsilon zeta eta " * 2]
    per_epoch = sum(len(split_windows(d, 16)) for d in docs)
    log = Log()
    stream = WindowStream(docs, 16, seed=1, log=log)
    epochs = []
    for _ in range(7):  # 7 steps of 3 windows: 21 windows, over 2 epoch ends
        stream.take(3)
        epochs.append(stream.epoch)
    assert per_epoch == 9 and stream.windows_per_epoch == per_epoch
    assert epochs == [(3 * (k + 1) - 1) // per_epoch for k in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert log == ["data.train: epoch 0 ended (9 windows per epoch, 9 taken); epoch 1 repeats the data "
                   "in a new document order",
                   "data.train: epoch 1 ended (9 windows per epoch, 18 taken); epoch 2 repeats the data "
                   "in a new document order"]


def test_a_corpus_smaller_than_a_step_is_warned_about_once():
    log = Log()
    stream = WindowStream(["tiny corpus here"], 16, seed=0, log=log)
    first = stream.take(4)
    assert first == ["tiny corpus here"] * 4 and stream.epoch == 3
    stream.take(4)
    assert stream.epoch == 7
    assert len(log) == 1 and "only 1 window per epoch, fewer than the 4 one step takes" in log[0]


def test_resume_is_exact_across_epochs_and_old_states_load():
    docs = [f"document number {i} " * (i + 1) for i in range(5)]
    full = WindowStream(docs, 24, seed=4)
    windows = [full.take(5) for _ in range(8)]
    for stop in (1, 3, 6):
        run = WindowStream(docs, 24, seed=4)
        for _ in range(stop):
            run.take(5)
        state = run.state_dict()
        log = Log()
        resumed = WindowStream(docs, 24, seed=4, log=log)
        old = {k: v for k, v in state.items() if k != "epoch"}  # saved before epochs were recorded
        resumed.load_state_dict(old)
        assert [resumed.take(5) for _ in range(8 - stop)] == windows[stop:]
        assert resumed.epoch == full.epoch and resumed.position == full.position
        n = full.windows_per_epoch
        assert state["epoch"] == (stop * 5 - 1) // n
        # only the epochs that end after the resume point are announced, each once
        assert [m.split(" ended")[0] for m in log] == \
            [f"data.train: epoch {e - 1}" for e in range(1, 40 // n + 1) if stop * 5 <= e * n < 40]
    with pytest.raises(DataError, match="other windows"):
        WindowStream(docs, 32, seed=4).load_state_dict(state)
