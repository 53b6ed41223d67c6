"""Small explicit vocabularies for conversion tests (imported by the test modules)."""
from bld_scale.tokenize.token_bytes import TokenBytes

SINGLE_BYTES = [bytes([b]) for b in range(256)]


def table_vocab(pieces, specials=("<eos>",)):
    """A TokenBytes over an explicit vocabulary, tokenizing by greedy longest match."""
    table = [p.encode() if isinstance(p, str) else p for p in pieces] + [None] * len(specials)
    by_len = sorted({len(p) for p in table if p}, reverse=True)
    lookup = {p: i for i, p in enumerate(table) if p}

    def encode(text):
        data, ids, pos = text.encode(), [], 0
        while pos < len(data):
            for size in by_len:
                if data[pos:pos + size] in lookup:
                    ids.append(lookup[data[pos:pos + size]])
                    pos += size
                    break
        return ids

    return TokenBytes(name="table", table=table, vocab_size=len(table), _encode_ids=encode)
