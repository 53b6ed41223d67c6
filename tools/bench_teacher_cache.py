"""What a teacher cache costs and loses, on the demo teacher (one run, prints a table):

    python tools/bench_teacher_cache.py [--config RECIPE] [--heldout-windows 24] [--speed-steps 16]
        [--student-steps 0] [--seeds 0,1,2]

1. bytes stored per text byte, for the fixed top-k (k in {2, 4, 8, 16, 32, 257} x {float16, float32})
   and the adaptive codec (KL per value lam and tail mass tau, each in {uint8, float16}, cap 255;
   and sqrt codes by lam and by their steps; with the mean count of byte values kept): the size
   of a shard (safetensors, index and window digests included) of the held-out windows' rows, over
   their bytes, as it is and compressed as the writer stores it by default (sqrt: each stream by
   its coder, `cache.streams`; the others: xz); and the default codec change by change from the
   sqrt codes before it (every value coded in 63 steps, the rest a log code, xz over the shard);
2. the KL lost to truncation and quantisation, KL(q || decoded q), on held-out text, in bits per
   text byte (q: the recipe's conversion of the teacher's forward), with the remaining mass spread
   by the tail profile by context, as a cache decodes (`bld_scale.cache.tail`; estimated on
   --profile-windows training windows, as a cache of them would) and, for comparison, by one
   profile for every row (caches made before the contexts) and uniformly;
3. steps per second of the same training step (`train.step.distill_step`, plain torch, no DeepSpeed)
   with the online teacher (forward + conversion) and from a cache of the default k and dtype;
4. for comparison, what a token-level cache of the same teacher would store (tokens kept per
   position to leave 1 % of the mass out), and the default codec's encoding and packing speed;
5. with --student-steps N: held-out BPB of students trained N steps from the default cache and
   online, one per seed in --seeds (the seed sets the student's initialisation; the windows are the
   recipe's stream, the same for every seed, as the cache holds them).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bld_scale.cache.layout import COMPRESSION, codec_label, default_compression, shard_bytes, window_index  # noqa: E402
from bld_scale.cache.quantize import store_logprobs, store_sqrt  # noqa: E402
from bld_scale.cache.reader import TeacherCache  # noqa: E402
from bld_scale.cache.rows import (DEFAULT_DTYPE, DEFAULT_KL_PER_VALUE, DEFAULT_SQRT_STEPS, DEFAULT_TAIL_MASS,  # noqa: E402
                                  DEFAULT_TOP_K, context_tail_sums, decode_rows, encode_rows, tail_prior, tail_sums)
from bld_scale.cache.tail import window_contexts  # noqa: E402
from bld_scale.cache.writer import build_cache, teacher_rows  # noqa: E402
from bld_scale.config import load_recipe  # noqa: E402
from bld_scale.data.batch import PairTokenizer, collate  # noqa: E402
from bld_scale.data.sources import WindowStream, heldout_windows, open_corpus  # noqa: E402
from bld_scale.evaluate import bits_per_byte, student_nll_sums  # noqa: E402
from bld_scale.parallel.engines import param_groups, warmup_cosine  # noqa: E402
from bld_scale.train.setup import seed_everything, setup_student, setup_tokenizers, teacher_section  # noqa: E402
from bld_scale.train.step import distill_step  # noqa: E402

KS, DTYPES = (2, 4, 8, 16, 32, 257), ("float16", "float32")
TAUS, ADAPTIVE_DTYPES, CAP = (0.1, 0.03, 0.01, 0.005, 0.003, 0.001), ("uint8", "float16"), 255
LAMS = (0.03, 0.02, 0.015, 0.01, 0.005, 0.003, 0.002, 0.001)  # KL per value, bits
SQRT_STEPS = (31, 40, 63)  # besides the default, at the default KL per value
# (k, dtype, tail mass, KL per value, sqrt steps) of every row of the table: the fixed top-k ones,
# then the adaptive ones by tail mass, then by KL per value, then sqrt codes by their steps
CODECS = ([(k, dt, 0.0, 0.0, DEFAULT_SQRT_STEPS) for k in KS for dt in DTYPES]
          + [(CAP, dt, tau, 0.0, DEFAULT_SQRT_STEPS) for tau in TAUS for dt in ADAPTIVE_DTYPES]
          + [(CAP, dt, 0.0, lam, DEFAULT_SQRT_STEPS) for lam in LAMS for dt in ("sqrt", *ADAPTIVE_DTYPES)]
          + [(CAP, "sqrt", 0.0, DEFAULT_KL_PER_VALUE, s) for s in SQRT_STEPS])
DEFAULT = (DEFAULT_TOP_K, DEFAULT_DTYPE, DEFAULT_TAIL_MASS, DEFAULT_KL_PER_VALUE, DEFAULT_SQRT_STEPS)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "launch" / "recipes" / "demo.yaml"))
    p.add_argument("--heldout-windows", type=int, default=24)
    p.add_argument("--profile-windows", type=int, default=64)
    p.add_argument("--speed-steps", type=int, default=16)
    p.add_argument("--student-steps", type=int, default=0, help="0: skip the student comparison")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--plot", default=None, help="write the size-vs-KL plot of the codecs here (PNG)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def shard_size(rows, texts, stored, compression=None) -> int:
    """Bytes of one shard holding these windows' rows, as the writer stores it."""
    return len(shard_bytes({**window_index(texts, [r.shape[0] for r in rows]), **stored}, compression))


def token_row_counts(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per real teacher position, how many of its most probable tokens a token-level cache would
    store to leave at most `tau` of the mass out (the tail-mass rule, applied to tokens)."""
    p = torch.softmax(logits[mask.bool()].double(), dim=-1).sort(dim=-1, descending=True).values
    return ((1 - p.cumsum(-1)) > tau).sum(-1) + 1


def codec_speed(q: torch.Tensor, rows, texts) -> str:
    """Encoding rows/s with the default codec, and packing its shard and back, one CPU thread."""
    from bld_scale.cache.layout import shard_tensors

    t0 = time.perf_counter()
    stored = encode_rows(q, *DEFAULT)
    encode = len(q) / (time.perf_counter() - t0)
    tensors = {**window_index(texts, [r.shape[0] for r in rows]), **stored}
    compression = default_compression(DEFAULT_DTYPE)
    plain = shard_bytes(tensors, None)
    t0 = time.perf_counter()
    packed = shard_bytes(tensors, compression)
    compress = time.perf_counter() - t0
    t0 = time.perf_counter()
    shard_tensors(packed, compression)
    decompress = time.perf_counter() - t0
    return (f"default codec, 1 CPU thread: encoding {encode / 1e3:.0f}k rows/s; packing ({compression}) "
            f"{len(plain) / compress / 1e6:.1f} MB/s of plain shard ({len(q) / compress / 1e3:.0f}k text bytes/s), "
            f"unpacking {len(plain) / decompress / 1e6:.0f} MB/s ({len(q) / decompress / 1e3:.0f}k text bytes/s)")


def plot_codecs(points: list[dict], title: str, path: str) -> None:
    """KL lost against xz-compressed bytes per text byte, one line per row rule, with the issue's goals
    (8 B per text byte, 0.01 bits per byte) and the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    series = {"fixed top-k, float16": "tab:gray", "tail mass, uint8": "tab:orange", "KL per value, uint8": "tab:blue",
              f"KL per value, sqrt/{DEFAULT_SQRT_STEPS}": "tab:purple",
              f"sqrt steps at KL per value {DEFAULT_KL_PER_VALUE:g}": "tab:pink"}
    for name, color in series.items():
        pts = sorted((r["xz"], r["kl"], r["label"]) for r in points if r["series"] == name and r["kl"] > 0)
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", color=color, label=name)
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    default = next(r for r in points if r["default"])
    ax.plot([default["xz"]], [default["kl"]], marker="*", markersize=16, color="tab:red", ls="none",
            label=f"default ({default['xz']:.1f} B, {default['kl']:.4f} bits)")
    ax.axvline(8, ls="--", color="black", lw=1)
    ax.axhline(0.01, ls="--", color="black", lw=1)
    ax.fill_between([1, 8], 1e-4, 0.01, color="tab:green", alpha=0.08, label="the goal: <= 8 B and <= 0.01 bits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(4, 120)
    ax.set_ylim(5e-4, 1)
    ax.set_xlabel("bytes stored per text byte (compressed shard: sqrt streams packed, others xz)")
    ax.set_ylabel("KL lost, bits per text byte (held-out)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def kl_bits_per_byte(q: torch.Tensor, stored: dict, prior=None, contexts=None) -> float:
    approx = decode_rows(stored, prior, contexts).double()
    q = q.double()
    p = q.exp()
    terms = torch.where(p > 0, p * (q - approx), torch.zeros_like(p))
    return float(terms.sum() / (len(q) * math.log(2)))


def sqrt_rows_before(q: torch.Tensor, kl_per_value: float) -> dict[str, torch.Tensor]:
    """The sqrt codes of caches before `cache.sqrt_rows`: every kept value's 6-bit code (63 steps),
    in increasing byte value, the rest a 1/16-nat log code (the same counts over 256 byte values)."""
    stored = encode_rows(q, CAP, "float32", 0.0, kl_per_value)
    return {"counts": stored["counts"], "symbols": stored["symbols"],
            "sqrt_probs": store_sqrt(stored["logprobs"].double()),
            "rest": store_logprobs(stored["rest"].double(), "uint8")}


def changes_to_the_default(q, q_train, contexts, contexts_train, sized) -> None:
    """The default codec change by change from the sqrt codes before it, at the default KL per value."""
    lam = DEFAULT_KL_PER_VALUE

    def kl(stored, stored_train):
        prior = tail_prior(tail_sums(q_train, stored_train), context_tail_sums(q_train, stored_train, contexts_train))
        return kl_bits_per_byte(q, stored, prior, contexts)

    before = (sqrt_rows_before(q, lam), sqrt_rows_before(q_train, lam))
    implied = (encode_rows(q, CAP, "sqrt", 0.0, lam, 63), encode_rows(q_train, CAP, "sqrt", 0.0, lam, 63))
    default = (encode_rows(q, *DEFAULT), encode_rows(q_train, *DEFAULT))
    print(f"the default codec change by change (KL per value {lam:g}): bytes per text byte, KL lost")
    for label, (stored, stored_train), compression in (
            ("before: every value in 6-bit sqrt codes, rest a log code, xz", before, COMPRESSION),
            ("+ the most probable implied, rest a sqrt code (63 steps), xz", implied, COMPRESSION),
            ("+ each stream by its coder (streams)", implied, "streams"),
            (f"+ {DEFAULT_SQRT_STEPS} steps (the default)", default, "streams")):
        print(f"  {label:<62} {sized(stored, compression):6.2f} {kl(stored, stored_train):9.5f}", flush=True)


class Trainer:
    """One student with AdamW and the recipe's schedule; `step` times one distill_step."""

    def __init__(self, recipe, sides, seed, steps):
        seed_everything(seed)
        self.student = setup_student(recipe, len(sides.student_tok))
        self.student.train()
        t = recipe.train
        self.opt = torch.optim.AdamW(param_groups(self.student, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, min(t.warmup_steps, steps // 4), steps, t.min_lr_ratio))
        self.clip, self.recipe = t.grad_clip, recipe

    def step(self, batch, sides, forward=None, targets=None):
        loss, _ = distill_step(forward, self.student, batch, self.recipe.distill, teacher_vocab=sides.teacher_vocab,
                               teacher_eos_id=sides.teacher_eos, teacher_targets=targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        self.opt.step()
        self.sched.step()

    @torch.no_grad()
    def bpb(self, batches) -> float:
        self.student.eval()
        nll = n = 0.0
        for b in batches:
            a, c = student_nll_sums(self.student, b)
            nll, n = nll + a, n + c
        self.student.train()
        return bits_per_byte(nll, n)


def train(recipe, sides, pair, seed, steps, batch, windows, forward=None, cache=None):
    trainer = Trainer(recipe, sides, seed, steps)
    t0 = time.perf_counter()
    for s in range(steps):
        part = windows[s * batch:(s + 1) * batch]
        b = collate([pair(w) for w in part], recipe.student.K, sides.teacher_bos, sides.student_bos)
        targets = cache.targets(b, part, s * batch) if cache is not None else None
        trainer.step(b, sides, forward=forward if cache is None else None, targets=targets)
    return trainer, steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM

    args = parse(argv)
    torch.set_num_threads(1)
    recipe = load_recipe(args.config, args.overrides)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_section(recipe).path, dtype=torch.float32).eval()
    sides = setup_tokenizers(recipe, teacher.config.get_text_config().vocab_size, log=lambda m: None)
    d = recipe.distill

    def forward(ids, mask, position_ids=None):
        return teacher(input_ids=ids, attention_mask=mask).logits

    rows_of = teacher_rows(forward, teacher, sides.teacher_vocab, bos=sides.teacher_bos, eos=sides.teacher_eos,
                           conversion=d.conversion, exact_chunk_tokens=d.exact_chunk_tokens,
                           backend=d.conversion_backend, device="cpu")
    corpus = open_corpus(recipe.data, log=None)
    texts = heldout_windows(corpus.heldout, recipe.data.window_bytes, args.heldout_windows)
    with torch.no_grad():
        rows = [r for i in range(0, len(texts), 8) for r in rows_of(texts[i:i + 8])]
    n_bytes = sum(r.shape[0] for r in rows)
    q = torch.cat(rows)
    steps = max(args.speed_steps, args.student_steps)
    windows = WindowStream(corpus.train, recipe.data.window_bytes, recipe.seed).take(
        max(steps * args.batch, args.profile_windows))
    with torch.no_grad():
        q_train = torch.cat([r for i in range(0, args.profile_windows, 8)
                             for r in rows_of(windows[i:min(i + 8, args.profile_windows)])])
    print(f"held-out: {len(texts)} windows, {n_bytes} text bytes; teacher {recipe.teacher.path}, "
          f"conversion {d.conversion}; EOT mass per row {float(q[:, 256].exp().mean()):.2e}; tail profile "
          f"from {args.profile_windows} training windows")
    print(f"{'row rule':>15} {'k':>4} {'dtype':>8} {'mean k':>7} {'bytes/text byte':>16} {'packed':>6} "
          f"{'KL lost, bits/byte: by context':>31} {'one profile':>12} {'uniform':>9}")
    contexts, contexts_train = window_contexts(texts), window_contexts(windows[:args.profile_windows])
    points = []
    for k, dtype, tau, lam, sqrt_steps in CODECS:
        stored_train = encode_rows(q_train, k, dtype, tau, lam, sqrt_steps)
        sums = tail_sums(q_train, stored_train)
        prior = tail_prior(sums, context_tail_sums(q_train, stored_train, contexts_train))
        stored = encode_rows(q, k, dtype, tau, lam, sqrt_steps)
        mean_k = float(stored["counts"].double().mean()) if "counts" in stored else float(k)
        mark = "  <- default" if (k, dtype, tau, lam, sqrt_steps) == DEFAULT else ""
        rule = f"KL/value {lam:g}" if lam else f"tail mass {tau:g}" if tau else "-"
        xz = shard_size(rows, texts, stored, default_compression(dtype)) / n_bytes
        kl = kl_bits_per_byte(q, stored, prior, contexts)
        label = f"sqrt/{sqrt_steps}" if dtype == "sqrt" else dtype
        print(f"{rule:>15} {(f'<={k}' if tau or lam else str(k)):>4} {label:>8} {mean_k:>7.1f} "
              f"{shard_size(rows, texts, stored) / n_bytes:>16.2f} {xz:>6.2f} {kl:>31.5f} "
              f"{kl_bits_per_byte(q, stored, tail_prior(sums)):>12.5f} {kl_bits_per_byte(q, stored):>9.5f}{mark}",
              flush=True)
        series = ("KL per value" if lam else "tail mass" if tau else "fixed top-k") + f", {label}"
        if dtype == "sqrt" and sqrt_steps != DEFAULT_SQRT_STEPS:
            series = f"sqrt steps at KL per value {DEFAULT_KL_PER_VALUE:g}"
        points.append({"series": series,
                       "label": f"{sqrt_steps} steps" if series.startswith("sqrt steps") else f"{lam:g}" if lam
                       else f"{tau:g}" if tau else f"k={k}",
                       "xz": xz, "kl": kl, "default": bool(mark)})
    if args.plot:
        plot_codecs(points, f"teacher cache codecs: {Path(recipe.teacher.path).name}, {n_bytes} held-out text bytes",
                    args.plot)

    changes_to_the_default(q, q_train, contexts, contexts_train,
                           lambda stored, compression: shard_size(rows, texts, stored, compression) / n_bytes)
    print(codec_speed(q, rows, texts), flush=True)
    pair_t = PairTokenizer(sides.teacher_vocab, sides.teacher_vocab)
    with torch.no_grad():
        counts = torch.cat([token_row_counts(forward(b.teacher_input_ids, b.teacher_attention_mask),
                                             b.teacher_attention_mask, 0.01)
                            for b in (collate([pair_t(w) for w in texts[i:i + 8]], 1, sides.teacher_bos,
                                              sides.teacher_bos) for i in range(0, len(texts), 8))])
    vocab = teacher.config.get_text_config().vocab_size
    id_bytes = ((vocab - 1).bit_length() + 7) // 8
    per_position = 2 + (id_bytes + 1) * float(counts.double().mean())  # count and rest; an id and a code per token
    print(f"a token-level cache instead (tail mass 0.01 over the teacher's {vocab} tokens): "
          f"{float(counts.double().mean()):.0f} tokens per position (median {int(counts.median())}), "
          f"{len(counts) / n_bytes:.2f} positions per text byte: {len(counts) * per_position / n_bytes:.1f} B per text "
          f"byte with {id_bytes}-byte ids and 1-byte codes, before compression", flush=True)

    pair = PairTokenizer(sides.teacher_vocab, sides.student_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with torch.no_grad():
            manifest = build_cache(recipe, tmp, rows_of, top_k=DEFAULT_TOP_K, dtype=DEFAULT_DTYPE,
                                   tail_mass=DEFAULT_TAIL_MASS, kl_per_value=DEFAULT_KL_PER_VALUE,
                                   max_windows=steps * args.batch, batch_size=8, log=lambda m: None)
        print(f"cache of {steps * args.batch} training windows ({codec_label(manifest)}) built in "
              f"{time.perf_counter() - t0:.1f} s")
        cache = TeacherCache.open(tmp, recipe, steps * args.batch)
        n = args.speed_steps
        _, online = train(recipe, sides, pair, 0, n, args.batch, windows, forward=forward)
        _, cached = train(recipe, sides, pair, 0, n, args.batch, windows, cache=cache)
        print(f"steps/s ({n} steps of {args.batch} windows, 1 CPU thread): online teacher {online:.2f}, "
              f"from the cache {cached:.2f} ({cached / online:.2f}x)", flush=True)
        if args.student_steps:
            heldout = heldout_windows(corpus.heldout, recipe.data.window_bytes, args.eval_windows)
            evals = [collate([pair(w) for w in heldout[i:i + 16]], recipe.student.K, sides.teacher_bos,
                             sides.student_bos) for i in range(0, len(heldout), 16)]
            result = {"online": [], "cache": []}
            for seed in (int(s) for s in args.seeds.split(",")):
                for name, kw in (("online", {"forward": forward}), ("cache", {"cache": cache})):
                    trainer, _ = train(recipe, sides, pair, seed, args.student_steps, args.batch, windows, **kw)
                    result[name].append(trainer.bpb(evals))
                print(f"seed {seed}: held-out BPB online {result['online'][-1]:.4f}, "
                      f"from the cache {result['cache'][-1]:.4f}", flush=True)
            for name, vals in result.items():
                print(f"student held-out BPB after {args.student_steps} steps, {name}: mean "
                      f"{statistics.mean(vals):.4f} (min {min(vals):.4f}, max {max(vals):.4f})")
            diffs = [c - o for c, o in zip(result["cache"], result["online"])]
            print(f"cache - online per seed: {', '.join(f'{x:+.4f}' for x in diffs)}")


if __name__ == "__main__":
    main()
