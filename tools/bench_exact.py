"""Figures for mode "exact" (issue 7): cost over one teacher forward, agreement with a brute force,
and the divergence between exact, cover and within_token on the demo teacher.

    python tools/bench_exact.py [--snippets 6] [--bytes 1000] [--threads 2] [--repeat 3] [--recipe RECIPE]

`--recipe` takes the teacher of a recipe instead of the demo's (a `.gguf` or `package:` path is
converted once, as the pipeline does), e.g. the SmolLM2-135M of `launch/recipes/smollm2_to_student.yaml`.

1. Cost: for held-out snippets, wall time of one teacher forward over [BOS] + tokens (the pass
   `cover` needs anyway) against the extra work of `exact` (prefix encodings, the tree-masked
   forward, the conversion), on the demo teacher (`bld_scale/assets/demo/teacher`) or, when it is
   missing, a tiny random Llama over the demo tokenizer. Minimum of `--repeat` runs each.
2. Brute force: mean Jensen-Shannon divergence (bits per byte) and max abs probability difference
   of `exact` to the enumeration of `tests/unit/test_byteconv_exact.py` (float64 tiny Llama, short
   strings, tiny and real vocabularies; needs `PYTHONPATH=tests:tests/unit`).
3. On the teacher: mean JSD per byte between exact, cover and within_token, and bits per byte of
   each.
4. `--bigram`: why `exact` does not filter the last token of a cover. The bigram test (a pair of
   tokens `(a, v)` is canonical when the tokenizer encodes `bytes(a) + bytes(v)` as `[a, v]`;
   exact for plain BPE) would drop, after each canonical prefix, the teacher's mass on `v` whose
   pair with the prefix's last token fails. It prints that mass and how often the text's own
   next token fails the test (a pre-tokenizer that looks ahead, e.g. GPT-2's `\s+(?!\S)`, splits
   "\n\n" before a word but not on its own: the test then rejects what the tokenizer produces).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bld_scale.convert import byte_logprobs
from bld_scale.convert.exact import byte_logprobs_exact, teacher_logprobs
from bld_scale.tokenize.token_bytes import TokenBytes


def jsd_bits(a_log: torch.Tensor, b_log: torch.Tensor) -> float:
    """Mean over rows of JSD(p, q) in bits, from log-probabilities [R, 257]."""
    p, q = a_log.double().exp(), b_log.double().exp()
    m = 0.5 * (p + q)

    def kl(x):
        return torch.where(x > 0, x * (torch.log(x) - torch.log(m)), torch.zeros_like(x)).sum(-1)

    return float((0.5 * kl(p) + 0.5 * kl(q)).mean() / math.log(2))


def byte_bpb(q: torch.Tensor, data: bytes) -> float:
    rows = q[torch.arange(len(data)), torch.tensor(list(data))].double()
    return float(-rows.sum() / (len(data) * math.log(2)))


def load_teacher(recipe_path: str | None = None):
    from transformers import AutoTokenizer

    from bld_scale.demo import TEACHER_DIR, load_demo_teacher

    if recipe_path:
        from transformers import AutoModelForCausalLM

        from bld_scale.config import load_recipe
        from bld_scale.train.setup import teacher_section

        recipe = load_recipe(recipe_path, [])
        folder = teacher_section(recipe).path
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(recipe.teacher.tokenizer or folder)
        return model, tok, f"{recipe.teacher.path} (recipe {recipe_path})"

    try:
        model, tok = load_demo_teacher()
        return model, tok, "demo teacher (bld_scale/assets/demo/teacher)"
    except FileNotFoundError:
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), tok, "tiny random Llama (demo teacher missing)"


def timed(fn, repeat):
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_teacher(args):
    model, tok, label = load_teacher(args.recipe)
    vocab = TokenBytes.from_tokenizer(tok, vocab_size=model.config.vocab_size)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    texts = text_snippets(args.snippets, args.bytes)
    print(f"teacher: {label}; {len(texts)} held-out snippets of ~{args.bytes} bytes; "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for text in texts:
        ids, _ = vocab.encode(text)
        t_fwd, lp = timed(lambda: teacher_logprobs(model, ids, bos), args.repeat)
        t_cover, cover = timed(lambda: byte_logprobs(lp, ids, vocab, eos_id=eos), args.repeat)
        within = byte_logprobs(lp, ids, vocab, eos_id=eos, mode="within_token")
        info: dict = {}
        t_exact, exact = timed(lambda: byte_logprobs_exact(lp, ids, vocab, teacher=model, eos_id=eos,
                                                           bos_id=bos, info=info), args.repeat)
        t_alone, _ = timed(lambda: byte_logprobs_exact(None, ids, vocab, teacher=model, eos_id=eos,
                                                       bos_id=bos), args.repeat)
        data = text.encode()
        n = len(data)
        rows.append(dict(tokens=len(ids), bytes=n, nodes=info["tree_nodes"], contexts=info["contexts"],
                         fwd=t_fwd, cover=t_cover, exact=t_exact, alone=t_alone,
                         jsd_cover=jsd_bits(cover[:n], exact[:n]), jsd_within=jsd_bits(within[:n], exact[:n]),
                         jsd_cw=jsd_bits(cover[:n], within[:n]),
                         bpb_exact=byte_bpb(exact, data), bpb_cover=byte_bpb(cover, data),
                         bpb_within=byte_bpb(within, data),
                         bpb_token=float(-lp[torch.arange(len(ids)), torch.tensor(ids)].double().sum()
                                         / (n * math.log(2)))))
    print(f"{'tok':>5} {'bytes':>6} {'ctx':>5} {'nodes':>5} {'fwd ms':>7} {'cover ms':>8} {'exact ms':>8} "
          f"{'exact/fwd':>9} {'JSD c-e':>8} {'JSD w-e':>8} {'JSD c-w':>8}")
    for r in rows:
        print(f"{r['tokens']:>5} {r['bytes']:>6} {r['contexts']:>5} {r['nodes']:>5} {1e3 * r['fwd']:>7.1f} "
              f"{1e3 * r['cover']:>8.1f} {1e3 * r['exact']:>8.1f} {r['exact'] / r['fwd']:>9.2f} "
              f"{r['jsd_cover']:>8.4f} {r['jsd_within']:>8.4f} {r['jsd_cw']:>8.4f}")

    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    fwd, cov, ex = mean("fwd"), mean("cover"), mean("exact")
    print(f"mean: forward {1e3 * fwd:.1f} ms; cover conversion {1e3 * cov:.1f} ms; exact (tree pass + "
          f"conversion) {1e3 * ex:.1f} ms = {ex / fwd:.2f}x one forward; forward + exact = "
          f"{(fwd + ex) / fwd:.2f}x one forward ({(fwd + ex) / (fwd + cov):.2f}x forward + cover)")
    al = mean("alone")
    print(f"exact from tokens alone (logprobs=None: canonical sequence and tree in one forward, then "
          f"conversion) {1e3 * al:.1f} ms = {al / fwd:.2f}x one forward ({al / (fwd + cov):.2f}x forward + cover)")
    print(f"mean JSD to exact (bits/byte): cover {mean('jsd_cover'):.4f}, within_token "
          f"{mean('jsd_within'):.4f}; cover vs within_token {mean('jsd_cw'):.4f}")
    print(f"mean bits per byte: token-level {mean('bpb_token'):.3f}, exact {mean('bpb_exact'):.3f}, "
          f"cover {mean('bpb_cover'):.3f}, within_token {mean('bpb_within'):.3f}")


def text_snippets(count: int, size: int) -> list[str]:
    from bld_scale.data.corpus import load_works

    name, text = sorted(load_works("heldout").items())[0]
    data = text.encode()
    return [data[10_000 + i * 20_000: 10_000 + i * 20_000 + size].decode("utf-8", "ignore") for i in range(count)]


def bench_bigram(args):
    model, tok, label = load_teacher(args.recipe)
    vocab = TokenBytes.from_tokenizer(tok, vocab_size=model.config.vocab_size)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    texts_of = [_text_or_none(b) for b in vocab.all_token_bytes()]
    candidates = [v for v, t in enumerate(texts_of) if t is not None]
    passes: dict = {}

    def bigram_ok(a: int | None) -> np.ndarray:
        """ok[v]: the pair (a, v) survives the bigram test (a None: v alone). Pairs whose bytes
        are not text are not testable and kept."""
        if a not in passes:
            ok = np.ones(vocab.vocab_size, dtype=bool)
            if a is None or texts_of[a] is not None:
                head = [] if a is None else [a]
                prefix = "" if a is None else texts_of[a]
                encoded = tok([prefix + texts_of[v] for v in candidates], add_special_tokens=False)["input_ids"]
                ok[candidates] = [e == head + [v] for v, e in zip(candidates, encoded)]
            passes[a] = ok
        return passes[a]

    dropped, own_fails, positions = [], 0, 0
    for text in text_snippets(args.snippets, args.bytes):
        ids, _ = vocab.encode(text)
        p = teacher_logprobs(model, ids, bos).double().exp().numpy()
        for k in range(len(ids)):
            ok = bigram_ok(ids[k - 1] if k else None)
            dropped.append(float(p[k][~ok].sum()))
            own_fails += int(not ok[ids[k]])
            positions += 1
    dropped = np.asarray(dropped)
    print(f"bigram test on {label}, {args.snippets} held-out snippets ({positions} canonical prefixes, "
          f"{len(passes)} distinct last tokens): mass it would drop after a canonical prefix: mean "
          f"{dropped.mean():.4f}, median {np.median(dropped):.4f}, max {dropped.max():.4f}; the text's own "
          f"next token fails it at {own_fails} of {positions} prefixes")


def _text_or_none(b: bytes | None) -> str | None:
    """The token's text, or None for a row without bytes or bytes that are not UTF-8 on their own."""
    try:
        return None if b is None else b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def bench_brute_force():
    try:  # the reference lives with the tests, which import their helpers from tests/
        from test_byteconv_exact import SMALL, brute_force_exact, table_vocab, tiny_llama
    except ImportError as err:
        raise SystemExit(f"the brute-force section imports tests/unit/test_byteconv_exact.py ({err}): run "
                         "with PYTHONPATH=tests:tests/unit (or pass --skip-brute-force)") from None

    from bld_scale.convert.exact_contexts import exact_contexts
    from bld_scale.data.corpus import load_works
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    cases = []
    small = table_vocab(SMALL)
    cases += [(small, t, small._encode_ids, "tiny vocab") for t in ["there the é😀h", "these here"]]
    works = load_works("train")
    tok = train_byte_level_bpe([t[:30000] for t in list(works.values())[:4]], 600)
    bpe = TokenBytes.from_tokenizer(tok, vocab_size=len(tok) + 1)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    cases += [(bpe, t, enc, "BPE 600") for t in ["Thou there", "he's here.", "my lord,"]]
    jsds, diffs = [], []
    for seed, (vocab, text, encode, name) in enumerate(cases):
        bos = eos = vocab.vocab_size - 1
        model = tiny_llama(vocab.vocab_size, seed=seed)
        ids, _ = vocab.encode(text)
        lp = teacher_logprobs(model, ids, bos)
        got = byte_logprobs_exact(lp, ids, vocab, teacher=model, eos_id=eos, bos_id=bos, prefix_window=None)
        ref = brute_force_exact(model, vocab, ids, bos, eos, encode, exact_contexts(ids, vocab).shift)
        n = len(b"".join(vocab.token_bytes(i) for i in ids))
        with np.errstate(divide="ignore"):
            ref_log = torch.as_tensor(np.log(ref))
        jsds.append(jsd_bits(got[:n], ref_log[:n]))
        diffs.append(float(np.abs(got.double().exp().numpy() - ref).max()))
        print(f"brute force, {name}, {text!r}: JSD {jsds[-1]:.2e} bits/byte, max |dp| {diffs[-1]:.2e}")
    print(f"brute force: mean JSD {np.mean(jsds):.2e} bits/byte, max |dp| {max(diffs):.2e} over {len(cases)} texts")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=6)
    parser.add_argument("--bytes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-brute-force", action="store_true")
    parser.add_argument("--bigram", action="store_true", help="only the bigram-test figures (section 4)")
    parser.add_argument("--recipe", default=None, help="use this recipe's teacher (default: the demo teacher)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bigram:
        bench_bigram(args)
        return
    if not args.skip_brute_force:
        bench_brute_force()
    bench_teacher(args)


if __name__ == "__main__":
    main()
