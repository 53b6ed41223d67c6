"""Documents from text, JSONL and Parquet (Hugging Face datasets), and the window stream."""
from __future__ import annotations

import json

import pytest

from bld_scale.data.batch import split_windows
from bld_scale.data.sources import WindowStream, heldout_windows, load_documents, rank_share

DOCS = ["First document, é 😀.\nWith two lines.\n", "Second one: to be or not to be.\n" * 5,
        "Third, short."]


@pytest.fixture()
def corpus(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "docs.parquet")
    return tmp_path


@pytest.mark.parametrize("fmt, pattern, field", [("text", "doc*.txt", "text"), ("jsonl", "docs.jsonl", "body"),
                                                  ("parquet", "docs.parquet", "body")])
@pytest.mark.parametrize("streaming", [False, True])
def test_every_format_gives_the_documents_whole(corpus, fmt, pattern, field, streaming):
    docs = load_documents([str(corpus / pattern)], fmt, field, streaming)
    assert list(docs) == DOCS
    assert list(docs) == DOCS  # re-iterable: each pass starts over


def test_missing_files_and_columns_are_named(corpus):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_documents([str(corpus / "nothing.jsonl")], "jsonl")
    with pytest.raises(ValueError, match="'content' is not a column"):
        load_documents([str(corpus / "docs.jsonl")], "jsonl", "content")


def test_builtin_corpus_split():
    train = load_documents(["builtin:train"])
    heldout = load_documents(["builtin:heldout"])
    assert len(train) == 39 and len(heldout) == 3
    assert not set(train) & set(heldout)


def _all_windows(docs, size):
    return [w for d in docs for w in split_windows(d, size)]


def test_stream_is_deterministic_resumable_and_covers_every_window():
    size = 16
    a = WindowStream(DOCS, size, seed=3)
    first = a.take(5) + a.take(7)
    b = WindowStream(DOCS, size, seed=3)
    b.load_state_dict(WindowStream(DOCS, size, seed=3).state_dict() | {"position": 5})
    assert b.take(7) == first[5:]  # resumed at the position, same windows
    epoch = len(_all_windows(DOCS, size))
    c = WindowStream(DOCS, size, seed=3)
    one_epoch = c.take(epoch)
    assert sorted(one_epoch) == sorted(_all_windows(DOCS, size))  # every window once per epoch
    assert c.take(epoch) != one_epoch  # the next epoch is reshuffled by document


def test_stream_refuses_a_position_from_other_settings():
    state = WindowStream(DOCS, 16, seed=3).state_dict()
    with pytest.raises(ValueError, match="other windows"):
        WindowStream(DOCS, 32, seed=3).load_state_dict(state)


def test_streaming_corpora_keep_their_stored_order(corpus):
    docs = load_documents([str(corpus / "docs.jsonl")], "jsonl", "body", streaming=True)
    stream = WindowStream(docs, 1000, seed=0)
    assert stream.take(3) == DOCS


def test_empty_corpus_is_refused():
    with pytest.raises(ValueError, match="holds no text"):
        WindowStream(["", ""], 64, seed=0).take(1)


def test_rank_share_splits_a_global_batch_contiguously():
    windows = [str(i) for i in range(8)]
    assert rank_share(windows, 0, 2) + rank_share(windows, 1, 2) == windows
    with pytest.raises(ValueError, match="does not split"):
        rank_share(windows[:3], 0, 2)


def test_heldout_windows_are_the_first_ones_in_order():
    assert heldout_windows(DOCS, 16, 4) == _all_windows(DOCS, 16)[:4]
