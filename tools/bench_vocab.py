"""Benchmark TokenBytes and the sorted-vocabulary index on real vocabularies.

For Tekken (131,072 ids) and Mistral-7B v0.1's SentencePiece (32,000 pieces; also its Hugging Face
form) it prints the time to build `TokenBytes` and its `SortedVocabIndex` (goal: a few seconds at
most), and the encode throughput in bytes per second on the held-out works, next to the
tokenizer's own encode (the difference is the byte-exactness check and the spans).

    python tools/bench_vocab.py [--repeat 3] [--only tekken,mistral_sp,mistral_hf]

Offline; prints figures only.
"""
from __future__ import annotations

import argparse
import time

from bld_scale.data.corpus import load_works
from bld_scale.tokenize import zoo as tokenizer_zoo
from bld_scale.tokenize.token_bytes import TokenBytes


def _own_encode(tok):
    """The tokenizer's own plain-text encode, for comparison."""
    import sentencepiece as spm
    import tiktoken

    if isinstance(tok, tiktoken.Encoding):
        return tok.encode_ordinary
    if isinstance(tok, spm.SentencePieceProcessor):
        return tok.encode_as_ids
    return lambda text: tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


LOADERS = {
    "tekken": tokenizer_zoo.tekken,
    "mistral_sp": tokenizer_zoo.mistral_sentencepiece,
    "mistral_hf": tokenizer_zoo.mistral_hf,
}


def bench(name: str, texts: list[str], repeat: int) -> dict:
    start = time.perf_counter()
    tok = LOADERS[name]()
    load_s = time.perf_counter() - start
    build_s, tb = _best(lambda: TokenBytes.from_tokenizer(tok), repeat)
    index_s, ix = _best(lambda: type(tb.index)(tb.all_token_bytes()), repeat)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    enc_s, encoded = _best(lambda: [tb.encode(t) for t in texts], repeat)
    own = _own_encode(tok)
    own_s, _ = _best(lambda: [own(t) for t in texts], repeat)
    n_tokens = sum(len(ids) for ids, _ in encoded)
    return dict(name=tb.name, vocab=tb.vocab_size, load_s=load_s, build_s=build_s, index_s=index_s,
                nodes=ix.num_nodes, max_len=tb.max_token_len, tokens=n_tokens, bytes=n_bytes,
                enc_bps=n_bytes / enc_s, own_bps=n_bytes / own_s)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--only", default=",".join(LOADERS), help="comma-separated subset")
    args = parser.parse_args(argv)
    works = load_works("heldout")
    texts = list(works.values())
    print(f"held-out works: {', '.join(works)} ({sum(len(t.encode()) for t in texts):,} bytes); "
          f"best of {args.repeat}")
    header = (f"{'tokenizer':<44} {'ids':>7} {'load s':>7} {'TokenBytes s':>12} {'index s':>8} "
              f"{'nodes':>8} {'max B':>5} {'bytes/token':>11} {'encode MB/s':>11} {'own MB/s':>9}")
    print(header)
    print("-" * len(header))
    for name in args.only.split(","):
        r = bench(name.strip(), texts, args.repeat)
        print(f"{r['name'][:44]:<44} {r['vocab']:>7,} {r['load_s']:>7.2f} {r['build_s']:>12.3f} "
              f"{r['index_s']:>8.3f} {r['nodes']:>8,} {r['max_len']:>5} {r['bytes'] / r['tokens']:>11.2f} "
              f"{r['enc_bps'] / 1e6:>11.2f} {r['own_bps'] / 1e6:>9.2f}")


if __name__ == "__main__":
    main()
