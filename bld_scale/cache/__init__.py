"""The offline teacher: its next-byte distributions over a recipe's training windows, on disk.

A cache holds the teacher's byte targets `q_n` (docs/byte-interface.md) for every text byte of
the first N windows of the recipe's window stream, in the stream's order. Byte offsets are the
coordinate every tokenizer shares, so one cache trains students of any tokenizer with the teacher
never loaded (`distill.teacher_cache`). `tools/cache_teacher.py` writes it (`writer`); the pipeline
reads it (`reader`); `rows` is the row codec (adaptive top values by `ragged`, by default in
`sqrt_rows`' codes, fixed top-k, or whole rows; stored values by `quantize`; the remaining mass
spread by `tail`), `layout` the files and the manifest (a sqrt shard's streams packed by
`streams`), `errors` the refusal type.
"""
