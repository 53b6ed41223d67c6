"""The distillation pipeline users run: setup functions and the training loop.

`launch/distill.py` is a thin entry point over `run(recipe)`. Each setup function does one
thing (tokenizers, models, engines, data, metrics) so tests and tools can reuse them; the ML step
itself lives in `bld_scale.step` and never sees DeepSpeed.

Under ZeRO-3 every rank must call each engine's forward the same number of times (each forward
all-gathers parameter shards), so evaluation splits its windows evenly over ranks.

Checkpoints (`bld_scale.checkpoint`, docs/checkpointing.md): every `checkpoint.interval` steps and
at the end; a run in an output_dir with a checkpoint resumes from it (same losses as an
uninterrupted run); SIGTERM/SIGUSR1 save at the next step boundary and return early.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bld_scale.checkpoint.manager import (CheckpointManager, ResumeError, folder_bytes, identity_problems,
                         install_stop_handlers, read_meta, run_identity)
from bld_scale.config import Recipe, save_resolved
from bld_scale.data.batch import PairTokenizer, collate, resolve_bos
from bld_scale.data.sources import WindowStream, heldout_windows, load_documents, rank_share
from bld_scale.evaluate import TeacherNllSums, bits_per_byte, student_nll_sums, teacher_nll_sums
from bld_scale.train.step import check_same_tokenizer, distill_step
from bld_scale.model.heads import HEAD_CONFIG_FILE
from bld_scale.model.student import build_student, save_student
from bld_scale.train.tracking import MetricsWriter
from bld_scale.tokenize.token_bytes import TokenBytes

EVAL_WINDOWS = 32  # held-out windows per evaluation (rounded down to a multiple of the world size)


@dataclass
class Sides:
    teacher_tok: object
    student_tok: object
    teacher_vocab: TokenBytes
    student_vocab: TokenBytes
    teacher_bos: int
    student_bos: int
    teacher_eos: int | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_tokenizers(recipe: Recipe, teacher_vocab_size: int, log=print) -> Sides:
    from transformers import AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(recipe.teacher.tokenizer or recipe.teacher.path)
    s_tok = AutoTokenizer.from_pretrained(recipe.student.tokenizer)
    if teacher_vocab_size < len(t_tok):
        raise ValueError(f"teacher tokenizer {recipe.teacher.tokenizer or recipe.teacher.path} has "
                         f"{len(t_tok)} ids but the teacher model embeds only {teacher_vocab_size}: "
                         "wrong tokenizer for this model (teacher.tokenizer)")
    t_vocab = TokenBytes.from_tokenizer(t_tok, vocab_size=teacher_vocab_size, name=f"teacher tokenizer ({recipe.teacher.path})")
    s_vocab = TokenBytes.from_tokenizer(s_tok, name=f"student tokenizer ({recipe.student.tokenizer})")
    t_bos, t_src = resolve_bos(t_tok, recipe.teacher.bos_token)
    s_bos, s_src = resolve_bos(s_tok)
    log(f"teacher BOS id {t_bos} ({t_src}); student BOS id {s_bos} ({s_src})")
    if recipe.distill.method == "token_kd":
        check_same_tokenizer(t_vocab, s_vocab)
    return Sides(t_tok, s_tok, t_vocab, s_vocab, t_bos, s_bos, getattr(t_tok, "eos_token_id", None))


def _torch_dtype(name: str):
    from bld_scale.parallel.engines import resolve_precision

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(name)]


def setup_teacher(recipe: Recipe, ds_config: dict):
    """The frozen teacher as a ZeRO-3 inference engine; HF loads it shard by shard under ZeRO-3."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from bld_scale.parallel.engines import build_teacher_engine

    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build under zero.Init
    model = AutoModelForCausalLM.from_pretrained(recipe.teacher.path, dtype=_torch_dtype(recipe.teacher.dtype))
    engine = build_teacher_engine(model, ds_config)
    del keep_alive
    return engine


def _student_config_dict(recipe: Recipe) -> dict:
    config = recipe.student.config
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    return dict(config)


def _has_train_records(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    with open(metrics) as f:
        return any('"kind": "train"' in line for line in f)


def setup_student(recipe: Recipe, vocab_size: int):
    s = recipe.student
    config = _student_config_dict(recipe)
    if config.get("vocab_size") not in (None, vocab_size):
        raise ValueError(f"student.config has vocab_size={config['vocab_size']} but the student "
                         f"tokenizer has {vocab_size} ids: remove vocab_size from the config (it is "
                         "filled from the tokenizer) or use the matching tokenizer")
    config["vocab_size"] = vocab_size
    head_size = {}
    if s.head == "causal":
        head_size = {"width": s.head_hidden_size or config.get("hidden_size"), "layers": s.head_num_layers}
    return build_student(config, head_kind=s.head, K=s.K, attn_implementation=s.attn_implementation,
                         head_size=head_size)


class Pipeline:
    """Everything one run holds; `train()` runs it."""

    def __init__(self, recipe: Recipe, fresh: bool = False):
        from bld_scale.parallel.engines import build_ds_config, build_student_engine, init_distributed, teacher_ds_config

        self.recipe = recipe
        self.stop = install_stop_handlers()  # SIGTERM / SIGUSR1 -> save at the next step boundary
        self.rank, self.world = init_distributed()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() \
            else torch.device("cpu")
        seed_everything(recipe.seed)  # same initial student on every rank
        out = Path(recipe.output_dir)
        self.ckpt = CheckpointManager(recipe.checkpoint_dir, self.rank, self.world, recipe.checkpoint.keep)
        self.identity = run_identity(recipe, _student_config_dict(recipe)) if self.rank == 0 else None
        self.resume_dir, self.resumed = self._prepare_output(fresh)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, out / "recipe.resolved.yaml")
        self.metrics = MetricsWriter(out, self.rank == 0, recipe.logging.tensorboard,
                                     recipe.logging.wandb_project, recipe.to_dict(),
                                     purge_step=int(self.resumed["step"]) + 1 if self.resumed else None)
        student_cfg = build_ds_config(recipe, self.world)
        # loaded for every method: even `ce` reports the teacher's held-out BPB for comparison
        self.teacher = setup_teacher(recipe, teacher_ds_config(student_cfg, recipe.teacher.dtype))
        teacher_vocab_size = self.teacher.module.config.get_text_config().vocab_size
        self.sides = setup_tokenizers(recipe, teacher_vocab_size, log=self.log)
        student = setup_student(recipe, len(self.sides.student_tok))
        self.n_student_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
        self.log(f"student: {self.n_student_params / 1e6:.2f}M parameters "
                 f"({recipe.student.head} byte head, K={recipe.student.K}); world size {self.world}")
        universal = self.resumed is not None and self.ckpt.needs_universal(self.resumed)
        if universal:  # saved with another world size: DeepSpeed's universal checkpoint
            student_cfg["checkpoint"] = {"load_universal": True}
        self.student = build_student_engine(student, recipe, student_cfg)
        self.pair = PairTokenizer(self.sides.teacher_vocab, self.sides.student_vocab)
        data = recipe.data
        self.stream = WindowStream(load_documents(data.train, data.format, data.text_field, data.streaming),
                                   data.window_bytes, recipe.seed)
        heldout = load_documents(data.heldout, data.format, data.text_field, False) if data.heldout else []
        n_eval = max(self.world, EVAL_WINDOWS - EVAL_WINDOWS % self.world)
        eval_windows = heldout_windows(heldout, data.window_bytes, n_eval)
        eval_windows = eval_windows[: len(eval_windows) - len(eval_windows) % self.world]
        self.eval_windows = rank_share(eval_windows, self.rank, self.world) if eval_windows else []
        self.start_step = 0
        if self.resumed is not None:
            t0 = time.perf_counter()
            self.ckpt.load(self.student, self.resume_dir)
            self.stream.load_state_dict(self.resumed["data"])
            self.start_step = int(self.resumed["step"])
            rng_from = self.ckpt.load_rng(self.resume_dir)  # last: nothing above may draw from them
            how = f"universal checkpoint, saved with {self.resumed['world_size']} ranks" if universal \
                else "same world size"
            self.log(f"resumed from {self.resume_dir} at step {self.start_step} ({how}; data position "
                     f"{self.stream.position}; RNG from {rng_from}) in {time.perf_counter() - t0:.1f} s")

    def _prepare_output(self, fresh: bool) -> tuple[Path | None, dict | None]:
        """Rank 0 decides: resume from the current checkpoint, start fresh, or refuse; all follow.

        Resuming truncates metrics.jsonl to its length at the checkpoint, so records of steps the
        resumed run redoes are not duplicated.
        """
        decision = {"resume": None, "error": None}
        if self.rank == 0:
            try:
                decision["resume"] = self._decide(fresh)
            except ResumeError as err:
                decision["error"] = str(err)
        if self.world > 1:
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if decision["error"]:
            raise ResumeError(decision["error"])
        if decision["resume"] is None:
            return None, None
        step_dir = Path(decision["resume"])
        return step_dir, read_meta(step_dir)

    def _decide(self, fresh: bool) -> str | None:
        r = self.recipe
        out = Path(r.output_dir)
        metrics = out / "metrics.jsonl"
        self.ckpt.remove_partial()
        if fresh:
            self.ckpt.discard_all()
            for name in ("metrics.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
            for name in ("final", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
            return None
        latest = self.ckpt.latest()
        if latest is None:
            if _has_train_records(metrics):
                raise ResumeError(
                    f"output_dir {out} holds a run (training records in {metrics.name}) but no checkpoint "
                    f"in {self.ckpt.root} to resume from; pass --fresh to discard it and start over, or "
                    "choose another output_dir")
            metrics.unlink(missing_ok=True)  # only pre-training records of an attempt that died early
            return None
        meta = read_meta(latest)
        problems = identity_problems(meta.get("identity", {}), self.identity)
        if problems:
            raise ResumeError(
                f"refusing to resume {latest} with this recipe:\n  - " + "\n  - ".join(problems) +
                f"\nUse the original models and tokenizers, or start a new run (another output_dir, or "
                "--fresh to discard this one)")
        if int(meta["step"]) > r.train.max_steps:
            raise ResumeError(f"{latest} is at step {meta['step']}, past train.max_steps={r.train.max_steps}")
        size = metrics.stat().st_size if metrics.is_file() else 0
        keep = int(meta.get("metrics_bytes", size))
        if size > keep:
            with open(metrics, "r+b") as f:
                f.truncate(keep)
        return str(latest)

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[bld_scale] {message}", flush=True)

    def _batch(self, windows):
        batch = collate([self.pair(w) for w in windows], self.recipe.student.K,
                        self.sides.teacher_bos, self.sides.student_bos)
        return batch.to(self.device)

    def _teacher_forward(self, ids, mask):
        return self.teacher(input_ids=ids, attention_mask=mask).logits

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _agree_forwards(self, count: int) -> int:
        """The most teacher forwards any rank needs this step: ZeRO-3 ranks must call it alike."""
        if self.world == 1:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _eval_batches(self):
        mb = self.recipe.train.micro_batch_size
        for i in range(0, len(self.eval_windows), mb):
            yield self._batch(self.eval_windows[i:i + mb])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_student(self) -> float | None:
        if not self.eval_windows:
            return None
        self.student.eval()
        nll = n_bytes = 0.0
        for batch in self._eval_batches():
            a, b = student_nll_sums(self.student, batch)
            nll, n_bytes = nll + a, n_bytes + b
        self.student.train()
        nll, n_bytes = self._all_sum([nll, n_bytes])
        return bits_per_byte(nll, n_bytes)

    @torch.no_grad()
    def evaluate_teacher(self) -> dict | None:
        """Teacher token-level and byte-level BPB on the held-out windows, and their gap."""
        if not self.eval_windows:
            return None
        d = self.recipe.distill
        sums = TeacherNllSums()
        for batch in self._eval_batches():
            # exact: tree forwards, as many on every rank (ZeRO-3 ranks must stay in step)
            teacher_nll_sums(self._teacher_forward, batch, self.sides.teacher_vocab, conversion=d.conversion,
                             teacher_model=self.teacher, eos_id=self.sides.teacher_eos,
                             exact_chunk_tokens=d.exact_chunk_tokens, agree_forwards=self._agree_forwards,
                             into=sums)
        bpb = TeacherNllSums(*self._all_sum(sums.as_list())).bpb()
        return {"teacher_token_bpb": bpb.token_bpb, "teacher_byte_bpb": bpb.byte_bpb,
                "conversion_gap": bpb.gap, "conversion": d.conversion}

    # ------------------------------------------------------------------ training
    def _agree_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (signal or stop file)."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> dict:
        r, t = self.recipe, self.recipe.train
        start = self.start_step
        if self.resumed is None:
            teacher_eval = self.evaluate_teacher()
            if teacher_eval:
                self.metrics.log(0, "teacher_eval", teacher_eval)
                self.log(f"teacher held-out BPB {teacher_eval['teacher_token_bpb']:.4f} (token level), "
                         f"{teacher_eval['teacher_byte_bpb']:.4f} (byte level, {teacher_eval['conversion']}); "
                         f"conversion gap {teacher_eval['conversion_gap']:+.4f}")
            bpb_before = self.evaluate_student()
            if bpb_before is not None:
                self.metrics.log(0, "eval", {"student_bpb": bpb_before})
            sums: dict[str, float] = {}
            window_seconds = 0.0
        else:
            teacher_eval, bpb_before = self.resumed.get("teacher_eval"), self.resumed.get("student_bpb_before")
            saved = self.resumed.get("log_sums") or {}
            # the saved sums are already summed over ranks: rank 0 carries them, the others add zeros
            sums = {k: (v if self.rank == 0 else 0.0) for k, v in saved.items()}
            window_seconds = float(self.resumed.get("log_window_seconds", 0.0))
        self.evals = (teacher_eval, bpb_before)
        global_batch = t.micro_batch_size * t.grad_accum * self.world
        progress = _progress(t.max_steps, self.rank == 0, start)
        window_start = time.perf_counter() - window_seconds
        last_saved = start if self.resumed is not None else None
        stopped = start if self._agree_stop() else None  # asked to stop before any step: nothing new
        for step in range(start + 1, t.max_steps + 1):
            if stopped is not None:
                break
            mine = rank_share(self.stream.take(global_batch), self.rank, self.world)
            for m in range(t.grad_accum):
                batch = self._batch(mine[m * t.micro_batch_size:(m + 1) * t.micro_batch_size])
                loss, logs = distill_step(self._teacher_forward, self.student, batch, r.distill,
                                          teacher_vocab=self.sides.teacher_vocab, teacher_eos_id=self.sides.teacher_eos,
                                          teacher_model=self.teacher, agree_forwards=self._agree_forwards)
                self.student.backward(loss)
                lr = self.student.get_lr()[0]  # after step() it would be the next step's
                self.student.step()
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                sums["_micro"] = sums.get("_micro", 0.0) + 1.0
            progress.update(1)
            # decided before this step's record is written: a signal seen after it lands in the next step
            stop = self._agree_stop()
            if step % t.log_interval == 0 or step == t.max_steps:
                record = self._reduce_logs(sums, time.perf_counter() - window_start)
                record["lr"] = lr
                self.metrics.log(step, "train", record)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
                sums, window_start = {}, time.perf_counter()
            if t.eval_interval and step % t.eval_interval == 0 and step != t.max_steps:
                self.metrics.log(step, "eval", {"student_bpb": self.evaluate_student()})
            interval = r.checkpoint.interval
            if stop or (interval and step % interval == 0):
                window_start += self.save(step, sums, time.perf_counter() - window_start)
                last_saved = step
            if stop:
                stopped = step
        progress.close()
        if stopped is not None:
            self.log(f"stop requested ({self.stop.received or 'another rank'}): stopped at step {stopped}, "
                     f"checkpoint {self.ckpt.latest()}; run the same command again to resume")
            self.metrics.close()
            return {"stopped_at": stopped, "steps": t.max_steps}
        if r.checkpoint.interval and last_saved != t.max_steps:
            self.save(t.max_steps, sums, 0.0)
        bpb_after = self.evaluate_student()
        if bpb_after is not None:
            self.metrics.log(t.max_steps, "eval", {"student_bpb": bpb_after})
        summary = {"steps": t.max_steps, "method": r.distill.method, "student_bpb_before": bpb_before,
                   "student_bpb_after": bpb_after, **(teacher_eval or {})}
        self.metrics.log(t.max_steps, "summary", summary)
        self.save_final()
        if self.rank == 0:
            (Path(r.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            print(summary_table(summary), flush=True)
        self.metrics.close()
        return summary

    def save(self, step: int, sums: dict, window_seconds: float) -> float:
        """Checkpoint `step` (every rank calls it); returns the seconds it took."""
        t0 = time.perf_counter()
        keys = sorted(sums)
        global_sums = dict(zip(keys, self._all_sum([sums[k] for k in keys]))) if keys else {}
        teacher_eval, bpb_before = self.evals
        metrics_path = Path(self.recipe.output_dir) / "metrics.jsonl"
        meta = {"data": self.stream.state_dict(), "log_sums": global_sums, "log_window_seconds": window_seconds,
                "metrics_bytes": metrics_path.stat().st_size if self.rank == 0 and metrics_path.is_file() else 0,
                "teacher_eval": teacher_eval, "student_bpb_before": bpb_before,
                "student_parameters": self.n_student_params, "max_steps": self.recipe.train.max_steps,
                "identity": self.identity, "recipe": self.recipe.to_dict()}
        folder = self.ckpt.save(self.student, step, meta, self._write_student_files)
        seconds = time.perf_counter() - t0
        if self.rank == 0:
            self.log(f"checkpoint {folder} ({folder_bytes(folder) / 1e6:.1f} MB) in {seconds:.1f} s")
        return seconds

    def _write_student_files(self, folder: Path) -> None:
        """Config, tokenizer and byte-head description: enough to rebuild the student from shards."""
        module = self.student.module
        folder.mkdir(parents=True, exist_ok=True)
        module.lm.config.save_pretrained(folder)
        self.sides.student_tok.save_pretrained(folder)
        head = module.byte_head
        (folder / HEAD_CONFIG_FILE).write_text(json.dumps(
            {"kind": head.kind, "hidden_size": head.hidden_size, "K": head.K, "size": head.size_config()},
            indent=2))

    def _reduce_logs(self, sums: dict, seconds: float) -> dict:
        keys = sorted(sums)
        totals = dict(zip(keys, self._all_sum([sums[k] for k in keys])))
        count = totals.pop("_micro")  # micro-batches over all ranks since the last record
        record = {k: v / count for k, v in totals.items() if k not in ("tokens", "bytes")}
        record["tokens_per_s"] = totals.get("tokens", 0.0) / seconds
        record["bytes_per_s"] = totals.get("bytes", 0.0) / seconds
        record["data_position"] = self.stream.position
        return record

    def save_final(self) -> None:
        """The trained student as a Hugging Face folder with its byte head beside it."""
        import deepspeed

        module = self.student.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                save_student(module, Path(self.recipe.output_dir) / "final")
                self.sides.student_tok.save_pretrained(Path(self.recipe.output_dir) / "final")


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", dynamic_ncols=True)


def summary_table(summary: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    rows = [("teacher, token level", summary.get("teacher_token_bpb")),
            (f"teacher, byte level ({summary.get('conversion', 'cover')})", summary.get("teacher_byte_bpb")),
            ("conversion gap (byte - token)", summary.get("conversion_gap")),
            ("student before", summary.get("student_bpb_before")),
            (f"student after {summary['steps']} steps ({summary['method']})", summary.get("student_bpb_after"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'held-out bits per byte'.ljust(width)} | value  |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {name.ljust(width)} | {fmt(value)} |" for name, value in rows]
    return "\n".join(lines)


def run(recipe: Recipe, fresh: bool = False) -> dict:
    """Train (resuming from the current checkpoint in the run's folder, if any); see Pipeline."""
    return Pipeline(recipe, fresh=fresh).train()
