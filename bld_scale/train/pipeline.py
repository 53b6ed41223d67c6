"""The distillation pipeline users run: the training loop over parts built by `train.setup`.

`launch/distill.py` is a thin entry point over `run(recipe)`. The ML step itself lives in
`bld_scale.train.step` and never sees DeepSpeed.

Held-out evaluation (student and teacher bits per byte) is `train.heldout.HeldOutEvaluation`.

State and checkpoints (docs/checkpointing.md): the loop's state apart from the models is a
`TrainState` (`state_dict()` / `load_state_dict()`); `bld_scale.checkpoint` decides whether the
run resumes (`prepare_run_directory`) and when a step is saved (`CheckpointManager.due`): every
`checkpoint.interval` steps and at the end; a run in an output_dir with a checkpoint resumes from
it (same losses as an uninterrupted run); SIGTERM/SIGUSR1/SIGINT, the stop file or a dead launcher
(`checkpoint.preemption`) save at the next step boundary and return early.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bld_scale.checkpoint import (CheckpointManager, cut_metrics, folder_bytes, install_stop_handlers, metrics_bytes,
                                  prepare_run_directory, read_meta, run_identity)
from bld_scale.config import Recipe, save_resolved
from bld_scale.data.batch import PairTokenizer, collate
from bld_scale.data.normalize import check_normal_forms
from bld_scale.data.packing import pack
from bld_scale.data.sources import WindowStream, heldout_windows, open_corpus, rank_share
from bld_scale.parallel.sequence import plain_attention
from bld_scale.train.sequence_step import sequence_parallel_step
from bld_scale.train.step import distill_step
from bld_scale.model.export import save_hf_folder, student_holding, write_student_files
from bld_scale.train.ranks import all_max, all_sum, any_rank
from bld_scale.train.setup import (load_teacher_config, seed_everything, setup_student, setup_teacher,
                                   setup_tokenizers, student_config_dict, teacher_placement)
from bld_scale.train.state import TrainState
from bld_scale.train.feed import MicroBatchFeed
from bld_scale.train.step_timer import StepTimer
from bld_scale.train.throughput import ModelFlops, parameter_count
from bld_scale.train.summary import summary_table
from bld_scale.train.heldout import HeldOutEvaluation
from bld_scale.train.tracking import MetricsWriter

EVAL_WINDOWS = 32  # held-out windows per evaluation (rounded down to a multiple of the world size)


class Pipeline(HeldOutEvaluation):
    """Everything one run holds; `train()` runs it."""

    def __init__(self, recipe: Recipe, fresh: bool = False):
        from bld_scale.parallel.engines import build_ds_config, build_student_engine, init_distributed, teacher_ds_config
        from bld_scale.parallel.sequence import enable_ulysses, sequence_layout

        self.recipe = recipe
        self.stop = install_stop_handlers()  # SIGTERM / SIGUSR1 / SIGINT -> save at the next step boundary
        self.rank, self.world = init_distributed()
        # parallel.sequence_parallel: groups of ranks share each window (refused here if it does not divide the world)
        self.layout = sequence_layout(recipe.parallel.sequence_parallel, self.world, self.rank)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() \
            else torch.device("cpu")
        seed_everything(recipe.seed)  # same initial student on every rank
        self.corpus = open_corpus(recipe.data, log=self.log)  # bad data is refused before any model loads
        self.teacher_cache = open_teacher_cache(recipe, self.world, self.log)  # None: the teacher runs online
        out = Path(recipe.output_dir)
        self.ckpt = CheckpointManager(recipe.checkpoint_dir, self.rank, self.world, recipe.checkpoint.keep,
                                      recipe.checkpoint.interval)
        self.identity = run_identity(recipe, student_config_dict(recipe)) if self.rank == 0 else None
        # resume / fresh / refuse: rank 0 decides (every rank verifies its share), and only then touches the folder
        self.resume_dir = prepare_run_directory(out, self.ckpt, self.identity, recipe.train.max_steps, fresh,
                                                self.rank, self.world, log=self.log)
        self.resumed = read_meta(self.resume_dir) if self.resume_dir is not None else None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, out / "recipe.resolved.yaml")
        self.metrics = MetricsWriter(out, self.rank == 0, recipe.logging.tensorboard,
                                     recipe.logging.wandb_project, recipe.to_dict(),
                                     purge_step=int(self.resumed["step"]) + 1 if self.resumed else None)
        student_cfg = build_ds_config(recipe, self.world)
        # tokenizers first: one that is not the teacher's own is refused before the teacher loads
        teacher_config = load_teacher_config(recipe)
        self.sides = setup_tokenizers(recipe, teacher_config.get_text_config().vocab_size, log=self.log,
                                      teacher_config=teacher_config)
        check_normal_forms([("data.train", self.corpus.train), ("data.heldout", self.corpus.heldout)],
                           [self.sides.teacher_vocab, self.sides.student_vocab], recipe.data.normalize, log=self.log)
        # loaded for every method (even `ce` reports the teacher's held-out BPB), unless targets come from a cache
        self.placement = None if self.teacher_cache is not None else teacher_placement(
            recipe, self.world, teacher_config, len(self.sides.student_tok), self.device, self.log)
        self.teacher = None if self.teacher_cache is not None else \
            setup_teacher(recipe, teacher_ds_config(student_cfg, recipe.teacher.dtype), self.placement.name, self.device)
        student = setup_student(recipe, len(self.sides.student_tok), teacher_config)
        self.n_student_params = parameter_count(student)
        self.log(f"student: {self.n_student_params / 1e6:.2f}M parameters "
                 f"({recipe.student.head} byte head, K={recipe.student.K}); world size {self.world}")
        universal = self.resumed is not None and self.ckpt.needs_universal(self.resumed)
        if universal:  # saved with another world size: DeepSpeed's universal checkpoint
            student_cfg["checkpoint"] = {"load_universal": True}
        self.student = build_student_engine(student, recipe, student_cfg)
        if self.layout.sp_size > 1:
            enable_ulysses([self.teacher.module, self.student.module.lm], self.layout, recipe.train.micro_batch_size)
            self.log(f"sequence parallel: {self.layout.sp_size} ranks share each window (DeepSpeed Ulysses), "
                     f"{self.layout.dp_size} data-parallel replicas")
        self.pair = PairTokenizer(self.sides.teacher_vocab, self.sides.student_vocab)
        self.timer, self.feed = StepTimer(self.device), None  # step parts; micro-batches (made in train())
        self.flops = ModelFlops.of_run(recipe, self.teacher, self.n_student_params, self.world, self.device)
        data = recipe.data
        self.stream = WindowStream(self.corpus.train, data.window_bytes, recipe.seed, log=self.log)
        heldout = self.corpus.heldout
        n_eval = max(self.world, EVAL_WINDOWS - EVAL_WINDOWS % self.world)
        eval_windows = heldout_windows(heldout, data.window_bytes, n_eval)
        eval_windows = eval_windows[: len(eval_windows) - len(eval_windows) % self.world]
        self.eval_windows = rank_share(eval_windows, self.rank, self.world) if eval_windows else []
        self.state = TrainState(self.stream, self.rank, self._all_sum)
        if self.resumed is not None:
            t0 = time.perf_counter()
            rng_from = self.ckpt.load(self.resume_dir, self.student, self)  # the engine, then this run's state
            if self.rank == 0:  # only now: a load that fails leaves metrics.jsonl whole
                cut_metrics(out, self.resumed["run"].get("metrics_bytes"))
            how = f"universal checkpoint, saved with {self.resumed['world_size']} ranks" if universal \
                else "same world size"
            self.log(f"resumed from {self.resume_dir} at step {self.state.step} ({how}; data position "
                     f"{self.stream.position}; RNG from {rng_from}) in {time.perf_counter() - t0:.1f} s")

    # ------------------------------------------------------------------ state (checkpointed)
    def state_dict(self) -> dict:
        """The loop's state apart from the models (collective: every rank calls it); see TrainState."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[bld_scale] {message}", flush=True)

    def _layout(self, windows):
        layout = pack if self.recipe.data.pack else collate  # packed: one row, no padding
        return layout([self.pair(w) for w in windows], self.recipe.student.K,
                      self.sides.teacher_bos, self.sides.student_bos)

    def _batch(self, windows):
        return self._layout(windows).to(self.device)

    def _prepare(self, windows, first: int):
        """A training micro-batch on the host (the feed's thread with data.prefetch): windows `first`,
        `first + 1`, ... of the stream laid out, and their cached byte targets (None without a cache)."""
        batch = self._layout(windows)
        return batch, self.teacher_cache.targets(batch, windows, first) if self.teacher_cache is not None else None

    def _teacher_forward(self, ids, mask, position_ids=None):
        self.timer.mark("teacher")  # ignored outside a training step
        # a packed row: without a KV cache transformers keeps attention inside each window
        packed = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
        logits = self.teacher(input_ids=ids, attention_mask=mask, **packed).logits
        self.timer.mark("conversion")  # what follows a teacher forward, up to the loss
        return logits

    def _all_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.device, self.world)

    def _agree_forwards(self, count: int) -> int:
        """The most teacher forwards any rank needs this step: ZeRO-3 ranks must call it alike
        (a replicated teacher's forwards are each rank's own: no agreement, no collective)."""
        if self.placement is not None and self.placement.name == "replicate":
            return count
        return all_max(count, self.device, self.world)

    def _step(self, batch, cached=None):
        """One micro-batch's loss and logs: the whole windows, or this rank's slice of them;
        `cached`: the batch's byte targets from distill.teacher_cache (no teacher loaded)."""
        kw = dict(teacher_vocab=self.sides.teacher_vocab, teacher_eos_id=self.sides.teacher_eos,
                  teacher_model=self.teacher, agree_forwards=self._agree_forwards)
        if self.layout.sp_size == 1:
            forward = self._teacher_forward if self.teacher is not None else None
            return distill_step(forward, self.student, batch, self.recipe.distill, teacher_targets=cached,
                                student_vocab=self.sides.student_vocab,
                                fused_token_ce=self.recipe.student.liger_fused_ce, **kw)
        return sequence_parallel_step(self._teacher_forward, self.student, batch, self.recipe.distill,
                                      self.layout.sequence_group(), self.layout.group_sum,
                                      plain_attention=plain_attention, **kw)

    # ------------------------------------------------------------------ training
    def _agree_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (signal or stop file)."""
        return any_rank(self.stop.requested, self.device, self.world)

    def train(self) -> dict:
        """Evaluate (a fresh run), train to train.max_steps, evaluate again, write final/."""
        try:
            return self._train()
        finally:  # stops the data thread whatever ended the run
            if self.feed is not None:
                self.feed.close()

    def _train(self) -> dict:
        t = self.recipe.train
        if self.state.evals_before is None:  # a resumed run brings them from its checkpoint
            self.state.evals_before = self._evaluate_before_training()
        start, window = self.state.step, self.state.window
        dp_rank, dp_size = self.layout.dp_rank, self.layout.dp_size  # the ranks of a sequence-parallel group share windows
        global_batch = t.micro_batch_size * t.grad_accum * dp_size
        progress = _progress(t.max_steps, self.rank == 0, start)
        window.begin()
        if self._agree_stop():  # asked to stop before any step: nothing new to save
            return self._stopped(start, progress)
        self.feed, timer = MicroBatchFeed(
            self.stream, self._prepare, steps=t.max_steps - start, global_batch=global_batch,
            micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, dp_rank=dp_rank, dp_size=dp_size,
            device=self.device, prefetch=self.recipe.data.prefetch,
            teacher_share=(1.0 / self.layout.sp_size) if self.flops.n_teacher else 0.0), self.timer
        for step in range(start + 1, t.max_steps + 1):
            timer.start_step()
            for m in range(t.grad_accum):
                timer.mark("data_wait")
                micro = self.feed.next()
                timer.mark("student")
                loss, logs = self._step(micro.batch, micro.cached)
                timer.mark("student")  # the backward
                self.student.backward(loss)
                timer.mark("optimizer")
                lr = self.student.get_lr()[0]  # after step() it would be the next step's
                self.student.step()
                window.add({**logs, "teacher_tokens": micro.teacher_tokens})
                timer.add("data_prepare", micro.prepare_s)
            timer.end_step()
            self.state.step = step
            progress.update(1)
            # decided before this step's record is written: a signal seen after it lands in the next step
            stop = self._agree_stop()
            if step % t.log_interval == 0 or step == t.max_steps:
                record = {**window.close(self._all_sum), "data_position": self.stream.position,
                          "epoch": self.stream.epoch, "lr": lr, **timer.close()}
                record.update(self.flops.fields(record))
                self.metrics.log(step, "train", record)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            if t.eval_interval and step % t.eval_interval == 0 and step != t.max_steps:
                self._evaluate_during_training(step)
            if self.ckpt.due(step, stopping=stop):
                window.exclude(self.save(step))  # saving is not training time
            if stop:
                return self._stopped(step, progress)
        progress.close()
        if self.ckpt.due(t.max_steps, end=True):
            self.save(t.max_steps)
        return self._finish()

    def _stopped(self, step: int, progress) -> dict:
        progress.close()
        self.log(f"stop requested ({self.stop.received or 'another rank'}): stopped at step {step}, "
                 f"checkpoint {self.ckpt.latest()}; run the same command again to resume")
        self.metrics.close()
        return {"stopped_at": step, "steps": self.recipe.train.max_steps}

    def _finish(self) -> dict:
        r, steps = self.recipe, self.recipe.train.max_steps
        teacher_eval, bpb_before = self.state.evals_before["teacher"], self.state.evals_before["student_bpb"]
        bpb_after = self.evaluate_student()
        if bpb_after is not None:
            self.metrics.log(steps, "eval", {"student_bpb": bpb_after})
        summary = {"steps": steps, "method": r.distill.method, "student_bpb_before": bpb_before,
                   "student_bpb_after": bpb_after, **(teacher_eval or {})}
        self.metrics.log(steps, "summary", summary)
        self.save_final()
        if self.rank == 0:
            (Path(r.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            print(summary_table(summary), flush=True)
        self.metrics.close()
        return summary

    def save(self, step: int) -> float:
        """Checkpoint `step` (every rank calls it); returns the seconds it took."""
        t0 = time.perf_counter()
        run = {"identity": self.identity, "recipe": self.recipe.to_dict(), "student_parameters": self.n_student_params,
               "metrics_bytes": metrics_bytes(self.recipe.output_dir) if self.rank == 0 else 0}
        folder = self.ckpt.save(step, self.student, self, run, lambda folder: write_student_files(
            self.student.module, self.sides.student_tok, folder))
        seconds = time.perf_counter() - t0
        if self.rank == 0:
            self.log(f"checkpoint {folder} ({folder_bytes(folder) / 1e6:.1f} MB) in {seconds:.1f} s")
        return seconds

    def save_final(self) -> None:
        """The trained student as a Hugging Face folder with its byte head beside it (model.export).

        Its fp32 master weights, gathered one parameter at a time onto rank 0's CPU
        (parallel.consolidate): the same tensors as tools/export_hf.py gives from the last checkpoint.
        """
        from bld_scale.parallel.consolidate import full_fp32_state

        state = full_fp32_state(self.student)  # collective: every rank
        if self.rank == 0:
            save_hf_folder(student_holding(self.student.module, state), self.sides.student_tok,
                           Path(self.recipe.output_dir) / "final")


def open_teacher_cache(recipe: Recipe, world: int, log):
    """distill.teacher_cache checked against the recipe (before any model loads), or None without one."""
    if not recipe.distill.teacher_cache:
        return None
    from bld_scale.cache.errors import TeacherCacheError
    from bld_scale.cache.reader import TeacherCache

    if recipe.parallel.sequence_parallel > 1:
        raise TeacherCacheError("distill.teacher_cache serves whole windows and parallel.sequence_parallel="
                                f"{recipe.parallel.sequence_parallel} splits them across ranks: train from the cache "
                                "with parallel.sequence_parallel=1 (a cache replaces the teacher logits SP exists to split)")

    t = recipe.train
    cache = TeacherCache.open(recipe.distill.teacher_cache, recipe, t.max_steps * t.micro_batch_size * t.grad_accum * world)
    log(f"teacher targets from the cache {recipe.distill.teacher_cache} ({cache.windows} windows, "
        f"{cache.codec}): the teacher is not loaded")
    return cache


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", dynamic_ncols=True)


def run(recipe: Recipe, fresh: bool = False) -> dict:
    """Train (resuming from the current checkpoint in the run's folder, if any); see Pipeline.

    Rank 0 holds output_dir's lock (`checkpoint.run_lock`) from before anything in the folder is
    read until the run ends: a second run on the same folder is refused (OutputDirLocked)."""
    from bld_scale.checkpoint.run_lock import locked_output_dir
    from bld_scale.parallel.engines import init_distributed

    rank, world = init_distributed()
    with locked_output_dir(recipe.output_dir, rank, world):
        return Pipeline(recipe, fresh=fresh).train()
