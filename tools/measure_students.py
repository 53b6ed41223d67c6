"""Held-out bits per byte of students distilled by `ce`, the cross-tokenizer baselines and `bld`.

One command, one process, no DeepSpeed:

    python tools/measure_students.py            # 4 variants x 3 seeds, writes docs/results/students.*

Variants: `ce`, `uld`, `mined`, `dskd`, `alm`, `bld_linear`, `bld_causal` (a bld variant may
name its byte targets: `bld_causal@exact`), and `token_kd`: the ceiling, a student of the same
body that uses the TEACHER's tokenizer (its own embedding rows) trained with token-level KD on the
same windows; the table reports every variant's parameter count.

For each seed every variant starts from the same student body (the recipe's student, built with
`bld_scale.train.pipeline.setup_student` right after `seed_everything(seed)`; the byte head is built after
the body, so the head kind does not change the body's init) and sees the same windows at every
step (a `WindowStream` seeded with the seed): equal steps, equal tokens. The loop is plain torch:
AdamW (no decay on 1-D weights), linear warmup + cosine (`bld_scale.parallel.engines.warmup_cosine`),
gradient clipping, fp32, the step itself is `bld_scale.train.step.distill_step`.

Every `--eval-every` steps the student's token NLL over the text bytes (`bld_scale.evaluate.student_nll_sums`) of a fixed
set of held-out windows (evenly spread over Hamlet, The Tempest and Twelfth Night, never trained
on) gives its held-out BPB. The teacher's token-level and byte-level BPB (and their gap) are
measured once on the same windows, for each conversion in `--teacher-conversions`.

Choices (lambda, lr, steps) must not be made on the held-out works: `--eval-on val` measures
instead on windows cut from the end of one TRAINING work (`--val-work`), which the training stream
then excludes (it is excluded in every run, so both modes train on the same text).

Outputs in `--out` (`--name` prefix, default `students`): `<name>.json` (every curve, per seed,
step times, teacher BPB), `<name>.md` (the table) and `<name>.png` (held-out BPB against steps:
mean line and min/max band over seeds per variant).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bld_scale.config import load_recipe
from bld_scale.convert.dispatch import MODES, ONE_PASS_MODES
from bld_scale.data.batch import PairTokenizer, collate, split_windows
from bld_scale.data.corpus import load_works
from bld_scale.data.sources import WindowStream
from bld_scale.evaluate import TeacherNllSums, bits_per_byte, student_nll_sums, teacher_nll_sums
from bld_scale.parallel.engines import param_groups, warmup_cosine
from bld_scale.train.setup import seed_everything, setup_student, setup_tokenizers
from bld_scale.train.step import distill_step

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "launch" / "recipes" / "demo.yaml"
VARIANTS = {  # name -> (method, head)
    "ce": ("ce", "causal"),
    "uld": ("uld", "causal"),
    "mined": ("mined", "causal"),
    "dskd": ("dskd", "causal"),
    "alm": ("alm", "causal"),
    "token_kd": ("token_kd", "causal"),  # the same-tokenizer ceiling: the teacher's tokenizer
    "bld_linear": ("bld", "linear"),
    "bld_causal": ("bld", "causal"),
}


def parse_variant(name: str) -> tuple[str, str, str | None]:
    """`bld_causal` -> ("bld", "causal", None); `bld_causal@exact` -> ("bld", "causal", "exact").

    The `@conversion` suffix lets one run compare byte-target rules on the same seeds, windows
    and teacher forwards; without it a variant trains with `--conversion`.
    """
    base, _, conversion = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r} in {name!r}; choose from {', '.join(VARIANTS)}")
    if conversion and conversion not in MODES:
        raise SystemExit(f"unknown conversion {conversion!r} in {name!r}; choose from {', '.join(MODES)}")
    method, head = VARIANTS[base]
    if conversion and method != "bld":
        raise SystemExit(f"{name!r}: only bld variants read byte targets, so only they take an @conversion")
    return method, head, conversion or None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (default: the demo's)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="ce,uld,bld_linear,bld_causal",
                   help=f"variants, comma-separated, from {', '.join(VARIANTS)}; a bld variant may name "
                        "its byte targets, e.g. bld_causal@exact (default: --conversion)")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=96, help="held-out windows (split evenly over the works)")
    p.add_argument("--eval-on", choices=("heldout", "val"), default="heldout",
                   help="heldout: the held-out works; val: the end of a training work (for choices)")
    p.add_argument("--val-work", default="othello", help="training work whose end is the validation set")
    p.add_argument("--val-windows", type=int, default=48)
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's train.lr")
    p.add_argument("--warmup", type=int, default=None, help="default: the recipe's train.warmup_steps")
    p.add_argument("--lambda-kl", type=float, default=None, help="default: the recipe's distill.lambda_kl")
    p.add_argument("--lambda-b", type=float, default=None, help="default: the recipe's distill.lambda_b")
    p.add_argument("--conversion", default=None, help="conversion used by bld training (default: recipe's, cover)")
    p.add_argument("--teacher-conversions", default="cover,within_token",
                   help="conversions for the teacher's byte-level BPB and gap (add 'exact' for the exact mode)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared, oversubscribed CPU")
    p.add_argument("--out", default=str(REPO / "docs" / "results"))
    p.add_argument("--name", default="students", help="file name prefix in --out")
    p.add_argument("--override", action="append", default=[], help="extra recipe key=value")
    p.add_argument("--replot", default=None, help="only rewrite the .md and .png from this results JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- data
def spread_windows(text: str, window_bytes: int, count: int) -> list[str]:
    """`count` windows evenly spaced through `text` (deterministic)."""
    windows = split_windows(text, window_bytes)
    if count >= len(windows):
        return windows
    return [windows[(i * len(windows)) // count] for i in range(count)]


def heldout_set(window_bytes: int, count: int) -> list[str]:
    works = load_works("heldout")
    names = sorted(works)
    out = []
    for i, name in enumerate(names):
        share = count // len(names) + (1 if i < count % len(names) else 0)
        out += spread_windows(works[name], window_bytes, share)
    return out


def train_and_val(window_bytes: int, val_work: str, val_windows: int):
    """Training documents (one work cut short) and validation windows (the cut-off end)."""
    works = load_works("train")
    if val_work not in works:
        raise SystemExit(f"--val-work {val_work!r} is not a training work; choose one of {', '.join(works)}")
    text = works[val_work].encode("utf-8")
    cut = max(0, len(text) - val_windows * window_bytes)
    nl = text.find(b"\n", cut)
    cut = nl + 1 if nl >= 0 else cut
    works = dict(works)
    works[val_work] = text[:cut].decode("utf-8")
    val = split_windows(text[cut:].decode("utf-8"), window_bytes)[:val_windows]
    return list(works.values()), val


# ---------------------------------------------------------------------------------------- eval
@torch.no_grad()
def eval_student(student, batches) -> float:
    student.eval()
    nll = n = 0.0
    for batch in batches:
        a, b = student_nll_sums(student, batch)
        nll, n = nll + a, n + b
    student.train()
    return bits_per_byte(nll, n)


@torch.no_grad()
def eval_teacher(teacher, sides, batches, modes, exact_chunk_tokens) -> dict:
    """Token-level BPB, and byte-level BPB and gap per conversion; one teacher forward per batch,
    shared by the conversions (`conversion_seconds`: each conversion's time, its own forwards in)."""
    measured = list(modes) or ["cover"]  # the token-level BPB comes with any conversion's sums
    sums = {m: TeacherNllSums() for m in measured}
    seconds = {m: 0.0 for m in measured}
    for batch in batches:
        logits = teacher(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask).logits
        for m in measured:
            t0 = time.perf_counter()
            teacher_nll_sums(lambda ids, mask, logits=logits: logits, batch, sides.teacher_vocab, conversion=m,
                             teacher_model=teacher, eos_id=sides.teacher_eos,
                             exact_chunk_tokens=exact_chunk_tokens, into=sums[m])
            seconds[m] += time.perf_counter() - t0
    first = sums[measured[0]]
    token_bpb = bits_per_byte(first.token_nll, first.n_bytes)
    out = {"token_bpb": token_bpb, "bytes": int(first.n_bytes), "byte_bpb": {}, "gap": {},
           "conversion_seconds": {m: seconds[m] for m in modes}}
    for m in modes:
        out["byte_bpb"][m] = bits_per_byte(sums[m].byte_nll, sums[m].n_bytes)
        out["gap"][m] = out["byte_bpb"][m] - token_bpb
    return out


# ---------------------------------------------------------------------------------------- training
class TokenOnly(torch.nn.Module):
    """The student without its byte head: the same token logits, no byte logits.

    Only `bld` reads the byte logits and held-out BPB reads only the token logits, so the other
    methods skip the head's compute; `bld` gets the full student. `dskd` asks for the last hidden
    state and reads `.lm` and `.projectors`.
    """

    def __init__(self, student):
        super().__init__()
        self.student = student

    @property
    def lm(self):
        return self.student.lm

    @property
    def projectors(self):
        return self.student.projectors

    def forward(self, input_ids, attention_mask=None, prev_bytes=None, return_hidden=False):
        out = self.student.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              output_hidden_states=return_hidden)
        return (out.logits, None, out.hidden_states[-1]) if return_hidden else (out.logits, None)


@torch.no_grad()
def body_checksum(student) -> float:
    return float(sum(p.double().sum() for p in student.lm.parameters()))


class Variant:
    """One (method, head) student of one seed with its optimizer and schedule."""

    def __init__(self, args, recipe, sides, name, seed, distill, teacher_config):
        self.name, self.seed = name, seed
        self.method, self.head, conversion = parse_variant(name)
        self.same_tokenizer = self.method == "token_kd"  # the ceiling: the teacher's tokenizer
        self.distill = dataclasses.replace(distill, method=self.method, conversion=conversion or distill.conversion)
        self.teacher_eos = sides.teacher_eos
        self.student_vocab = sides.teacher_vocab if self.same_tokenizer else sides.student_vocab
        recipe = dataclasses.replace(recipe, student=dataclasses.replace(recipe.student, head=self.head),
                                     distill=self.distill)
        seed_everything(seed)  # the body is built first: the same for every head kind
        vocab = sides.teacher_vocab.vocab_size if self.same_tokenizer else len(sides.student_tok)
        self.student = setup_student(recipe, vocab, teacher_config)
        self.n_params = sum(p.numel() for p in self.student.parameters())
        self.n_params_lm = sum(p.numel() for p in self.student.lm.parameters())
        self.checksum = body_checksum(self.student)
        self.student.train()
        self.forward = self.student if self.method == "bld" else TokenOnly(self.student)
        t = recipe.train
        lr = args.lr if args.lr is not None else t.lr
        warmup = args.warmup if args.warmup is not None else t.warmup_steps
        self.opt = torch.optim.AdamW(param_groups(self.student, t.weight_decay), lr=lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, warmup, args.steps, t.min_lr_ratio))
        self.grad_clip = t.grad_clip
        self.curve: list = []
        self.seconds: list = []
        self.logs: dict = {}

    def step(self, teacher_logits, batch, teacher_vocab, teacher_seconds, teacher_model=None, teacher_hidden=None,
             byte_targets_cache=None):
        t0 = time.perf_counter()
        forward = None if self.method == "ce" else (lambda ids, mask: teacher_logits)
        # conversion "exact" runs its own tree-masked teacher forwards, so it needs the model
        loss, logs = distill_step(forward, self.forward, batch, self.distill, teacher_vocab=teacher_vocab,
                                  teacher_eos_id=self.teacher_eos, teacher_model=teacher_model,
                                  student_vocab=self.student_vocab,
                                  teacher_hidden=teacher_hidden if self.method == "dskd" else None,
                                  byte_targets_cache=byte_targets_cache)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        # the teacher forward is shared by the variants of a step; each one that reads it pays for
        # it (conversion "exact" runs its own forwards, which carry the canonical tokens too)
        reads_forward = self.method != "ce" and not (self.method == "bld" and self.distill.conversion not in ONE_PASS_MODES)
        self.seconds.append(time.perf_counter() - t0 + (teacher_seconds if reads_forward else 0.0))
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + float(v)
        return float(loss.detach())

    def evaluate(self, step, eval_batches):
        self.curve.append((step, eval_student(TokenOnly(self.student), eval_batches)))
        return self.curve[-1][1]

    def record(self, steps):
        return {"variant": self.name, "method": self.method, "head": self.head,
                "tokenizer": "teacher's" if self.same_tokenizer else "student's",
                "params": self.n_params, "params_lm": self.n_params_lm,
                "conversion": self.distill.conversion if self.method == "bld" else None,
                "seed": self.seed, "curve": self.curve, "final_bpb": self.curve[-1][1],
                "body_checksum": self.checksum,
                "step_seconds_mean": statistics.mean(self.seconds),
                "step_seconds_median": statistics.median(self.seconds),
                "train_logs_mean": {k: v / steps for k, v in self.logs.items() if k not in ("tokens", "bytes")},
                "tokens": self.logs.get("tokens", 0.0), "bytes": self.logs.get("bytes", 0.0)}


def run_seed(args, recipe, sides, teacher, seed, variants, train_windows, make_batch, eval_batches, distill):
    """All variants of one seed in lockstep: the same windows at every step, one teacher forward.

    `make_batch(windows, same_tokenizer)` and `eval_batches[same_tokenizer]`: the ceiling
    (`token_kd`) reads the windows through the teacher's tokenizer on both sides; its teacher
    input is the same, so the one forward serves it too.
    """
    runs = [Variant(args, recipe, sides, name, seed, distill, teacher.config) for name in variants]
    if len({v.checksum for v in runs if not v.same_tokenizer}) > 1:
        raise RuntimeError(f"seed {seed}: variants start from different student bodies")
    for v in runs:
        v.evaluate(0, eval_batches[v.same_tokenizer])
    need_teacher = any(v.method != "ce" for v in runs)
    need_hidden = any(v.method == "dskd" for v in runs)
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        windows = train_windows[(step - 1) * args.batch: step * args.batch]
        batches = {same: make_batch(windows, same) for same in {v.same_tokenizer for v in runs}}
        batch = next(iter(batches.values()))
        t0 = time.perf_counter()
        logits = hidden = None
        if need_teacher:
            with torch.no_grad():
                out = teacher(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                              output_hidden_states=need_hidden)
            logits, hidden = out.logits, (out.hidden_states[-1] if need_hidden else None)
        t_teacher = time.perf_counter() - t0
        # bld variants of one rule share its byte targets (the first one computes them; its
        # s/step carries that cost, the others' do not)
        targets_cache: dict = {}
        losses = {v.name: v.step(logits, batches[v.same_tokenizer], sides.teacher_vocab, t_teacher, teacher, hidden,
                                 targets_cache) for v in runs}
        if step % args.eval_every == 0 or step == args.steps:
            bpbs = {v.name: v.evaluate(step, eval_batches[v.same_tokenizer]) for v in runs}
            print(f"  seed {seed} step {step:4d} [{time.perf_counter() - t_start:.0f} s] eval BPB "
                  + "  ".join(f"{k} {b:.4f}" for k, b in bpbs.items())
                  + " | loss " + " ".join(f"{k} {x:.3f}" for k, x in losses.items())
                  + " | s/step " + " ".join(f"{v.name} {statistics.mean(v.seconds[-args.eval_every:]):.2f}"
                                              for v in runs), flush=True)
    return [v.record(args.steps) for v in runs]


# ---------------------------------------------------------------------------------------- report
def summarize(runs, variants):
    table = {}
    for name in variants:
        finals = [r["final_bpb"] for r in runs if r["variant"] == name]
        if not finals:
            continue
        table[name] = {"mean": statistics.mean(finals), "min": min(finals), "max": max(finals),
                       "std": statistics.stdev(finals) if len(finals) > 1 else 0.0, "n": len(finals),
                       "params": next(r.get("params") for r in runs if r["variant"] == name),
                       "params_lm": next(r.get("params_lm") for r in runs if r["variant"] == name),
                       "step_seconds": statistics.mean(r["step_seconds_median"] for r in runs
                                                       if r["variant"] == name)}
    return table


def paired_gain(runs, a, b):
    """Per-seed BPB(a) - BPB(b) at the end (positive: b is better)."""
    fa = {r["seed"]: r["final_bpb"] for r in runs if r["variant"] == a}
    fb = {r["seed"]: r["final_bpb"] for r in runs if r["variant"] == b}
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]


def conversion_diffs(runs, variants) -> dict:
    """Per-seed BPB differences between variants that differ only in their `@conversion`.

    Seed-to-seed spread is far larger than the effect of the target rule, so the comparison is
    paired: the same seed, body, windows and teacher forwards, only the byte targets differ.
    """
    out = {}
    by_base: dict = {}
    for v in variants:
        base, _, conversion = v.partition("@")
        if conversion:
            by_base.setdefault(base, []).append(v)
    for group in by_base.values():
        for other in group[1:]:
            out[f"{group[0]} − {other}"] = paired_gain(runs, group[0], other)
    return out


def markdown(result) -> str:
    a = result["args"]
    teacher = result["teacher"]
    lines = [f"Held-out BPB ({result['eval_set']}: {result['eval_windows']} windows of "
             f"{a['window_bytes']} bytes, {teacher['bytes']} bytes) after {a['steps']} steps of "
             f"{a['batch']} windows, seeds {a['seeds']}; lr {a['lr']}, lambda_KL {a['lambda_kl']}, "
             f"conversion {a['conversion']} (a variant@conversion names its own).",
             "",
             "| model | held-out BPB (mean ± std) | min – max | s/step (median) | LM parameters (+ head, projectors) |",
             "|---|---|---|---|---|"]
    for name, row in result["table"].items():
        params = (f"{row['params_lm'] / 1e6:.2f}M (+{(row['params'] - row['params_lm']) / 1e6:.2f}M)"
                  if row.get("params_lm") else "")
        lines.append(f"| student, {name} | {row['mean']:.4f} ± {row['std']:.4f} | "
                     f"{row['min']:.4f} – {row['max']:.4f} | {row['step_seconds']:.2f} | {params} |")
    lines.append(f"| student before training | {result['before_mean']:.4f} | | | |")
    lines.append(f"| teacher, token level | {teacher['token_bpb']:.4f} | | | |")
    for m, v in teacher["byte_bpb"].items():
        lines.append(f"| teacher, byte level ({m}); gap | {v:.4f}; {teacher['gap'][m]:+.4f} | | | |")
    gains = result.get("gains", {})
    if gains:
        lines.append("")
        for name, g in gains.items():
            lines.append(f"- ce − {name} per seed: {', '.join(f'{x:+.4f}' for x in g)} "
                         f"(mean {statistics.mean(g):+.4f} bits/byte, "
                         f"{100 * statistics.mean(g) / result['table']['ce']['mean']:.1f}% of ce)")
    for label, g in result.get("conversion_diffs", {}).items():
        lines.append(f"- {label} per seed: {', '.join(f'{x:+.4f}' for x in g)} "
                     f"(mean {statistics.mean(g):+.4f} bits/byte; positive: the second is better)")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Held-out BPB against steps: mean line, min-max band over seeds; right panel zooms on the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.2, 1]})
    colors = {"ce": "tab:gray", "uld": "tab:orange", "bld_linear": "tab:blue", "bld_causal": "tab:green",
              "mined": "tab:red", "dskd": "tab:pink", "alm": "tab:olive", "token_kd": "black"}
    conversion_colors = {"cover": "tab:green", "exact": "tab:purple", "within_token": "tab:brown"}
    t = result["teacher"]
    a = result["args"]
    lows = []
    for ax, zoom in zip(axes, (False, True)):
        for name in result["table"]:
            curves = [r["curve"] for r in result["runs"] if r["variant"] == name]
            steps = [s for s, _ in curves[0]]
            vals = list(zip(*[[v for _, v in c] for c in curves]))
            keep = [i for i, s in enumerate(steps) if not zoom or s >= a["steps"] / 2]
            mean = [statistics.mean(vals[i]) for i in keep]
            color = colors.get(name) or conversion_colors.get(name.partition("@")[2])
            ax.plot([steps[i] for i in keep], mean, marker="." if zoom else None, color=color,
                    label=f"{name} ({result['table'][name]['mean']:.3f})")
            ax.fill_between([steps[i] for i in keep], [min(vals[i]) for i in keep],
                            [max(vals[i]) for i in keep], alpha=0.2, color=color)
            lows += [min(vals[i]) for i in keep]
        if not zoom:
            ax.axhline(t["token_bpb"], ls="--", color="black", lw=1,
                       label=f"teacher, token level ({t['token_bpb']:.3f})")
            ax.set_ylabel(f"{result['eval_set']} bits per byte", fontsize=8)
            ax.legend(fontsize=8)
            ax.set_title(f"{a['batch']} windows x {a['window_bytes']} B per step, seeds {a['seeds']}: "
                         "mean, min-max band", fontsize=9)
        else:
            ax.set_title("second half (zoom)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        stem = Path(args.replot).with_suffix("")
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, stem.with_suffix(".png"))
        print(markdown(result))
        return
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = load_recipe(args.recipe, args.override)
    d = recipe.distill
    distill = dataclasses.replace(d, lambda_b=d.lambda_b if args.lambda_b is None else args.lambda_b,
                                  lambda_kl=d.lambda_kl if args.lambda_kl is None else args.lambda_kl,
                                  conversion=args.conversion or d.conversion)
    wb = recipe.data.window_bytes
    if recipe.data.train != ["builtin:train"]:
        raise SystemExit("this tool measures the shipped corpus: the recipe's data.train must be [builtin:train]")

    from transformers import AutoModelForCausalLM

    from bld_scale.train.setup import teacher_section

    teacher = AutoModelForCausalLM.from_pretrained(teacher_section(recipe).path, dtype=torch.float32)  # .gguf: converted once
    teacher.requires_grad_(False)
    teacher.eval()
    sides = setup_tokenizers(recipe, teacher.config.get_text_config().vocab_size)
    pairs = {False: PairTokenizer(sides.teacher_vocab, sides.student_vocab),
             True: PairTokenizer(sides.teacher_vocab, sides.teacher_vocab)}  # the token_kd ceiling
    bos = {False: sides.student_bos, True: sides.teacher_bos}
    K = recipe.student.K

    def batches(windows, size, same=False):
        return [collate([pairs[same](w) for w in windows[i:i + size]], K, sides.teacher_bos, bos[same])
                for i in range(0, len(windows), size)]

    train_docs, val_windows = train_and_val(wb, args.val_work, args.val_windows)
    if args.eval_on == "heldout":
        eval_windows, eval_set = heldout_set(wb, args.eval_windows), "held-out works (hamlet, tempest, twelfth_night)"
    else:
        eval_windows, eval_set = val_windows, f"validation (end of training work {args.val_work})"
    eval_batches = {False: batches(eval_windows, 16)}
    if any(parse_variant(v)[0] == "token_kd" for v in variants):
        eval_batches[True] = batches(eval_windows, 16, same=True)
    print(f"eval on {eval_set}: {len(eval_windows)} windows", flush=True)

    t0 = time.perf_counter()
    modes = [m.strip() for m in args.teacher_conversions.split(",") if m.strip()]
    teacher_result = eval_teacher(teacher, sides, eval_batches[False], modes, distill.exact_chunk_tokens)
    print(f"teacher: token BPB {teacher_result['token_bpb']:.4f}; byte BPB "
          + ", ".join(f"{m} {v:.4f} (gap {teacher_result['gap'][m]:+.4f})" for m, v in teacher_result["byte_bpb"].items())
          + f" [{time.perf_counter() - t0:.1f} s]", flush=True)

    def make_batch(windows, same=False):
        return collate([pairs[same](w) for w in windows], K, sides.teacher_bos, bos[same])

    runs = []
    for seed in seeds:
        train_windows = WindowStream(train_docs, wb, seed).take(args.steps * args.batch)
        t1 = time.perf_counter()
        runs += run_seed(args, recipe, sides, teacher, seed, variants, train_windows, make_batch,
                         eval_batches, distill)
        print(f"seed {seed}: " + ", ".join(f"{r['variant']} {r['final_bpb']:.4f}" for r in runs if r["seed"] == seed)
              + f" [{time.perf_counter() - t1:.0f} s]", flush=True)

    table = summarize(runs, variants)
    result = {
        "args": {**vars(args), "seeds": seeds, "lr": args.lr if args.lr is not None else recipe.train.lr,
                 "lambda_kl": distill.lambda_kl, "lambda_b": distill.lambda_b,
                 "conversion": distill.conversion, "window_bytes": wb,
                 "warmup": args.warmup if args.warmup is not None else recipe.train.warmup_steps,
                 "weight_decay": recipe.train.weight_decay, "min_lr_ratio": recipe.train.min_lr_ratio,
                 "grad_clip": recipe.train.grad_clip},
        "command": "python tools/measure_students.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "eval_set": eval_set, "eval_windows": len(eval_windows), "teacher": teacher_result,
        "before_mean": statistics.mean(r["curve"][0][1] for r in runs),
        "table": table, "runs": runs,
        "gains": {v: paired_gain(runs, "ce", v) for v in variants if v != "ce" and "ce" in variants},
        "conversion_diffs": conversion_diffs(runs, variants),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result))
    plot(result, out / f"{args.name}.png")
    print(markdown(result))
    print(f"wrote {out / args.name}.json/.md/.png", flush=True)


if __name__ == "__main__":
    main()
