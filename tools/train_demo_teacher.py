#!/usr/bin/env python
"""Train the small demo teacher LM the project ships, on the CPU, with a plain training loop.

The teacher is a `LlamaForCausalLM` built from a config (no download): hidden 256, 4 layers,
4 heads, SwiGLU intermediate 688, tied embeddings, 4,096-id vocabulary (the teacher tokenizer from
`tools/train_demo_tokenizers.py`, which must run first), 512 positions.

Data: the corpus's training works only, tokenized once with the teacher tokenizer; each training
example is a window of `--seq-len` tokens at a random offset inside one work, prefixed with the
BOS `<|endoftext|>`, because the distillation pipeline feeds the teacher `[BOS] + t_1..t_L`
(docs/DESIGN.md). The window order and the initial weights come from `--seed` alone.

Optimisation: AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient
clipping, fp32. At the end the held-out works are scored: bits per byte = nats summed over
non-overlapping BOS-prefixed windows / (text bytes of those windows * ln 2), the bytes counted from
the tokens' byte spans (`TokenBytes.encode`).

Outputs (in `--out`, default `bld_scale/assets/demo/teacher/`): config.json, model.safetensors,
generation_config.json (next to the tokenizer files already there), metrics.jsonl (step, loss,
lr), TRAINING.json (seed, sizes, steps, wall time, held-out BPB) and the plot
docs/demo_teacher_loss.png.

    python tools/train_demo_teacher.py                 # the shipped run
    python tools/train_demo_teacher.py --time-steps 5  # only time a few steps, to size a run
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bld_scale.data.corpus import HELDOUT_WORKS, load_works
from bld_scale.demo import TEACHER_DIR
from bld_scale.tokenize.token_bytes import TokenBytes

REPO = Path(__file__).resolve().parents[1]

PLOT = REPO / "docs" / "demo_teacher_loss.png"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=TEACHER_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--steps", type=int, default=540)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="text tokens per window (plus the BOS)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine, 2 threads spin and run ~4x slower)")
    p.add_argument("--time-steps", type=int, default=0,
                   help="only time this many training steps (after one warm-up step) and exit")
    return p.parse_args()


def build_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    bos = tok.bos_token_id
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5, use_cache=True)
    # Seeded just before construction, so the initial weights depend on --seed only.
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def tokenize_works(works: dict[str, str], table: TokenBytes):
    """Per work: token ids (LongTensor) and the end byte offset of each token's text span."""
    out = {}
    for name, text in works.items():
        ids, spans = table.encode(text)  # byte-exact by construction, or it raises
        out[name] = (torch.tensor(ids, dtype=torch.long),
                     torch.tensor([b for _, b in spans], dtype=torch.long))
    return out


class WindowSampler:
    """Random windows of `seq_len` tokens inside single works, each prefixed with BOS.

    A window never straddles two works (the model should not learn fake transitions between
    plays). Works are picked in proportion to their number of possible windows, so every token
    position is about equally likely; the order is fixed by the seed.
    """

    def __init__(self, streams: list[torch.Tensor], seq_len: int, bos: int, seed: int):
        self.streams = [s for s in streams if len(s) > seq_len]
        self.seq_len, self.bos = seq_len, bos
        counts = torch.tensor([len(s) - seq_len for s in self.streams], dtype=torch.double)
        self.weights = counts / counts.sum()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> torch.Tensor:
        which = torch.multinomial(self.weights, size, replacement=True, generator=self.gen)
        rows = []
        for w in which.tolist():
            stream = self.streams[w]
            start = int(torch.randint(0, len(stream) - self.seq_len + 1, (1,), generator=self.gen))
            rows.append(torch.cat([torch.tensor([self.bos]), stream[start:start + self.seq_len]]))
        return torch.stack(rows)


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine down to --min-lr-ratio * --lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, args):
    # Decay only matrices (embeddings, projections); norms' gains stay free, as is customary.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, opt, batch, lr, clip) -> tuple[float, float]:
    for group in opt.param_groups:
        group["lr"] = lr
    # labels == inputs: the model shifts them, so row j predicts token j+1 and BOS is never a target.
    loss = model(input_ids=batch, labels=batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item(), grad_norm.item()


@torch.no_grad()
def heldout_bpb(model, heldout, seq_len: int, bos: int, batch: int = 16) -> dict:
    """Bits per byte on non-overlapping BOS-prefixed windows covering each held-out work.

    A window's tokens t_a..t_b are scored given [BOS] + earlier tokens of the same window, and
    its text bytes are end(t_b) - end(t_{a-1}) from the byte spans, so the byte count is exact.
    """
    model.eval()
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    per_work = {}
    for name, (ids, ends) in heldout.items():
        windows = []
        for a in range(0, len(ids), seq_len):
            b = min(a + seq_len, len(ids))
            n_bytes = int(ends[b - 1]) - (int(ends[a - 1]) if a > 0 else 0)
            windows.append((torch.cat([torch.tensor([bos]), ids[a:b]]), n_bytes))
        nats = 0.0
        for i in range(0, len(windows), batch):
            chunk = windows[i:i + batch]
            width = max(len(w) for w, _ in chunk)
            inp = torch.full((len(chunk), width), bos, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (w, _) in enumerate(chunk):
                inp[r, :len(w)] = w
                mask[r, :len(w)] = 1
            logp = model(input_ids=inp, attention_mask=mask).logits.float().log_softmax(-1)
            target = inp[:, 1:]
            tok_logp = logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nats -= float((tok_logp * mask[:, 1:]).sum())
        n_bytes = sum(n for _, n in windows)
        per_work[name] = nats / (n_bytes * math.log(2))
        total_nats += nats
        total_bytes += n_bytes
        total_tokens += len(ids)
    model.train()
    return {"bpb": total_nats / (total_bytes * math.log(2)), "nats": total_nats,
            "bytes": total_bytes, "tokens": total_tokens, "per_work_bpb": per_work,
            "nats_per_token": total_nats / total_tokens}


def unigram_bpb(train, heldout, vocab_size: int) -> float:
    """Held-out BPB of a Laplace-smoothed unigram model of the training tokens: the bar to beat."""
    counts = torch.ones(vocab_size, dtype=torch.double)
    for ids, _ in train.values():
        counts += torch.bincount(ids, minlength=vocab_size).double()
    logp = (counts / counts.sum()).log()
    nats = sum(-float(logp[ids].sum()) for ids, _ in heldout.values())
    n_bytes = sum(int(ends[-1]) for _, ends in heldout.values())
    return nats / (n_bytes * math.log(2))


def plot(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    # A running mean shows the trend through the per-batch noise.
    k = 25
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="batch loss")
    ax.plot(steps, smooth, lw=1.6, label=f"running mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version stamp, so reruns give equal files
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    from transformers import AutoTokenizer

    if not (args.out / "tokenizer.json").is_file():
        sys.exit(f"no teacher tokenizer in {args.out}: run python tools/train_demo_tokenizers.py first")
    tok = AutoTokenizer.from_pretrained(str(args.out))
    table = TokenBytes.from_tokenizer(tok, name="demo teacher tokenizer")
    train_works = load_works("train")
    assert not set(train_works) & set(HELDOUT_WORKS)
    train = tokenize_works(train_works, table)
    heldout = tokenize_works(load_works("heldout"), table)
    n_train_tokens = sum(len(ids) for ids, _ in train.values())
    print(f"training tokens: {n_train_tokens:,} in {len(train)} works; held-out tokens: "
          f"{sum(len(ids) for ids, _ in heldout.values()):,} in {len(heldout)} works")

    model = build_model(args, tok)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params:,} parameters (tied embeddings)")
    opt = make_optimizer(model, args)
    sampler = WindowSampler([ids for ids, _ in train.values()], args.seq_len, tok.bos_token_id, args.seed)

    if args.time_steps:
        train_step(model, opt, sampler.batch(args.batch), args.lr * 0.01, args.clip)  # warm-up
        start = time.perf_counter()
        for _ in range(args.time_steps):
            train_step(model, opt, sampler.batch(args.batch), args.lr * 0.01, args.clip)
        per = (time.perf_counter() - start) / args.time_steps
        print(f"{per:.3f} s/step at batch {args.batch} x {args.seq_len + 1} tokens; "
              f"{args.steps} steps would take {per * args.steps / 60:.1f} min")
        return

    metrics = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="teacher", unit="step", mininterval=2.0)
    for step in bar:
        lr = lr_at(step, args)
        loss, grad_norm = train_step(model, opt, sampler.batch(args.batch), lr, args.clip)
        if not math.isfinite(loss):
            sys.exit(f"loss became {loss} at step {step}; lower --lr")
        metrics.append({"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4)})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
    train_wall = time.perf_counter() - start

    print("scoring the held-out works")
    result = heldout_bpb(model, heldout, args.seq_len, tok.bos_token_id)
    baseline = unigram_bpb(train, heldout, len(tok))
    wall = time.perf_counter() - start
    print(f"held-out BPB {result['bpb']:.4f} (unigram baseline {baseline:.4f}); "
          f"training {train_wall / 60:.1f} min, total {wall / 60:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # safetensors is the (only) format in transformers 5
    with open(args.out / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    record = {
        "what": "demo teacher for cross-tokenizer byte-level distillation (bld_scale)",
        "made_by": "python tools/train_demo_teacher.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "model": {"class": "LlamaForCausalLM", "parameters": n_params, "hidden_size": args.hidden,
                  "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                  "intermediate_size": args.intermediate, "vocab_size": len(tok),
                  "max_position_embeddings": 512, "tie_word_embeddings": True, "dtype": "float32"},
        "data": {"train_works": sorted(train), "heldout_works": sorted(heldout),
                 "train_tokens": n_train_tokens, "window": f"[BOS] + {args.seq_len} tokens, random "
                 "offset inside one work"},
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "schedule": f"linear warmup {args.warmup} steps, cosine to {args.min_lr_ratio} x lr",
                      "grad_clip": args.clip},
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "epochs": round(args.steps * args.batch * args.seq_len / n_train_tokens, 3),
        "final_train_loss_mean_last_50": round(sum(m["loss"] for m in metrics[-50:]) / len(metrics[-50:]), 4),
        "wall_seconds": {"train": round(train_wall, 1), "total_with_eval": round(wall, 1)},
        "machine": f"{platform.machine()} CPU, {args.threads} torch threads (shared)",
        "heldout": {"bpb": round(result["bpb"], 4), "per_work_bpb": {k: round(v, 4) for k, v in result["per_work_bpb"].items()},
                    "bytes": result["bytes"], "tokens": result["tokens"],
                    "nats_per_token": round(result["nats_per_token"], 4),
                    "unigram_baseline_bpb": round(baseline, 4),
                    "method": f"non-overlapping windows of {args.seq_len} tokens, each after BOS; "
                              "nats / (text bytes from token spans * ln 2)"},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (args.out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(metrics, args.plot, f"demo teacher ({n_params / 1e6:.1f}M params, seed {args.seed}): "
                        f"held-out {result['bpb']:.3f} bits/byte")
    print(f"saved to {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
