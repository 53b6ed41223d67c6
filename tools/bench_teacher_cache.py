"""What a teacher cache costs and loses, on the demo teacher (one run, prints a table):

    python tools/bench_teacher_cache.py [--config RECIPE] [--heldout-windows 24] [--speed-steps 16]
        [--student-steps 0] [--seeds 0,1,2]

1. bytes stored per text byte, for the fixed top-k (k in {2, 4, 8, 16, 32, 257} x {float16, float32})
   and the adaptive codec (tail mass tau in {0.1, 0.03, 0.01, 0.005, 0.003, 0.001} x {uint8, float16},
   cap 255; with the mean count of byte values kept): the size of a shard (safetensors, index and
   window digests included) of the held-out windows' rows, over their bytes;
2. the KL lost to truncation and quantisation, KL(q || decoded q), on held-out text, in bits per
   text byte (q: the recipe's conversion of the teacher's forward), with the remaining mass spread
   by the tail profile (`bld_scale.cache.rows`; estimated on --profile-windows training windows,
   as a cache of them would) and, for comparison, uniformly;
3. steps per second of the same training step (`train.step.distill_step`, plain torch, no DeepSpeed)
   with the online teacher (forward + conversion) and from a cache of the default k and dtype;
4. with --student-steps N: held-out BPB of students trained N steps from the default cache and
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

from bld_scale.cache.reader import TeacherCache  # noqa: E402
from bld_scale.cache.rows import (DEFAULT_DTYPE, DEFAULT_TAIL_MASS, DEFAULT_TOP_K, decode_rows,  # noqa: E402
                                  encode_rows, tail_prior, tail_sums)
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
# (k, dtype, tail mass) of every row of the table: the fixed top-k ones, then the adaptive ones
CODECS = [(k, dt, 0.0) for k in KS for dt in DTYPES] + [(CAP, dt, tau) for tau in TAUS for dt in ADAPTIVE_DTYPES]
DEFAULT = (DEFAULT_TOP_K, DEFAULT_DTYPE, DEFAULT_TAIL_MASS)


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
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def shard_bytes(rows, texts, stored) -> int:
    from safetensors.torch import save

    sizes = torch.tensor([0] + [r.shape[0] for r in rows]).cumsum(0)
    return len(save({"row_offsets": sizes, "window_sha256": torch.zeros(len(texts), 8, dtype=torch.uint8),
                     **stored}))


def kl_bits_per_byte(q: torch.Tensor, stored: dict, prior=None) -> float:
    approx = decode_rows(stored, prior).double()
    q = q.double()
    p = q.exp()
    terms = torch.where(p > 0, p * (q - approx), torch.zeros_like(p))
    return float(terms.sum() / (len(q) * math.log(2)))


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
    print(f"{'tail mass':>9} {'k':>4} {'dtype':>8} {'mean k':>7} {'bytes/text byte':>16} "
          f"{'KL lost, bits/byte: profile':>28} {'uniform':>9}")
    for k, dtype, tau in CODECS:
        prior = tail_prior(tail_sums(q_train, encode_rows(q_train, k, dtype, tau)))
        stored = encode_rows(q, k, dtype, tau)
        mean_k = float(stored["counts"].double().mean()) if "counts" in stored else float(k)
        mark = "  <- default" if (k, dtype, tau) == DEFAULT else ""
        print(f"{(f'{tau:g}' if tau else '-'):>9} {(f'<={k}' if tau else str(k)):>4} {dtype:>8} {mean_k:>7.1f} "
              f"{shard_bytes(rows, texts, stored) / n_bytes:>16.2f} {kl_bits_per_byte(q, stored, prior):>28.5f} "
              f"{kl_bits_per_byte(q, stored):>9.5f}{mark}", flush=True)

    pair = PairTokenizer(sides.teacher_vocab, sides.student_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with torch.no_grad():
            build_cache(recipe, tmp, rows_of, top_k=DEFAULT_TOP_K, dtype=DEFAULT_DTYPE, tail_mass=DEFAULT_TAIL_MASS,
                        max_windows=steps * args.batch, batch_size=8, log=lambda m: None)
        print(f"cache of {steps * args.batch} training windows (tail mass {DEFAULT_TAIL_MASS:g}, k <= {DEFAULT_TOP_K}, "
              f"{DEFAULT_DTYPE}) built in "
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
