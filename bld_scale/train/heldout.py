"""Held-out evaluation of a run: the student's bits per byte, and the teacher's before training.

A mixin of `bld_scale.train.pipeline.Pipeline`, which provides what it reads: `recipe`, `student`,
`teacher` (None when targets come from a cache), `sides`, `eval_windows` (this rank's share),
`metrics`, `state`, `log`, `_batch`, `_all_sum`, `_teacher_forward`, `_agree_forwards`.
Under ZeRO-3 every rank must call each engine's forward the same number of times (each forward
all-gathers parameter shards), so the pipeline splits the held-out windows evenly over ranks.
"""
from __future__ import annotations

import torch

from bld_scale.evaluate import TeacherNllSums, bits_per_byte, student_nll_sums, teacher_nll_sums
from bld_scale.parallel.sequence import unsplit
from bld_scale.train.teacher_tokenizer import check_beats_uniform, eval_token_counts


class HeldOutEvaluation:
    def _eval_batches(self):
        mb = self.recipe.train.micro_batch_size
        for i in range(0, len(self.eval_windows), mb):
            yield self._batch(self.eval_windows[i:i + mb])

    @torch.no_grad()
    @unsplit  # each rank its own held-out windows, whole (no sequence parallelism)
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
    @unsplit  # each rank its own held-out windows, whole (no sequence parallelism)
    def evaluate_teacher(self) -> dict | None:
        """Teacher token-level and byte-level BPB on the held-out windows, and their gap."""
        if not self.eval_windows or self.teacher is None:
            return None
        d = self.recipe.distill
        sums = TeacherNllSums()
        for batch in self._eval_batches():
            # exact: tree forwards, as many on every rank (ZeRO-3 ranks must stay in step)
            teacher_nll_sums(self._teacher_forward, batch, self.sides.teacher_vocab, conversion=d.conversion,
                             teacher_model=self.teacher, eos_id=self.sides.teacher_eos,
                             exact_chunk_tokens=d.exact_chunk_tokens, agree_forwards=self._agree_forwards,
                             into=sums, backend=d.conversion_backend)
        bpb = TeacherNllSums(*self._all_sum(sums.as_list())).bpb()
        return {"teacher_token_bpb": bpb.token_bpb, "teacher_byte_bpb": bpb.byte_bpb,
                "conversion_gap": bpb.gap, "conversion": d.conversion}

    def _evaluate_before_training(self) -> dict:
        teacher_eval = self.evaluate_teacher()
        if teacher_eval:
            self.metrics.log(0, "teacher_eval", teacher_eval)
            self.log(f"teacher held-out BPB {teacher_eval['teacher_token_bpb']:.4f} (token level), "
                     f"{teacher_eval['teacher_byte_bpb']:.4f} (byte level, {teacher_eval['conversion']}); "
                     f"conversion gap {teacher_eval['conversion_gap']:+.4f}")
            # (d) of train.teacher_tokenizer: worse than a uniform guess -> the ids are not the model's
            check_beats_uniform(teacher_eval["teacher_token_bpb"],
                                *self._all_sum(eval_token_counts(self.eval_windows, self.sides.teacher_vocab)),
                                self.sides.teacher_vocab.vocab_size, self.recipe.teacher)
        bpb_before = self.evaluate_student()
        if bpb_before is not None:
            self.metrics.log(0, "eval", {"student_bpb": bpb_before})
        return {"teacher": teacher_eval, "student_bpb": bpb_before}

    def _evaluate_during_training(self, step: int) -> None:
        bpb = self.evaluate_student()
        self.metrics.log(step, "eval", {"student_bpb": bpb})
        if bpb is not None:
            self.log(f"step {step}: held-out student BPB {bpb:.4f}")
