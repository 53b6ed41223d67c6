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
- A data entry `builtin:train` / `builtin:heldout` / `builtin:all` names the shipped Shakespeare
  corpus (`bld_scale.corpus.load_works(split)`) and is not a path.
The resolved recipe (`save_resolved`) holds absolute paths only, so it reloads to the same recipe.

Each field's `metadata["help"]` is its one-line meaning: `recipe_keys_help` lists every key with
type, default and that line (`launch/distill.py --help`), so the dataclasses are the one source.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]  # bld_scale/config/schema.py -> the repo
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DS_CONFIG_NAMES = ("zero3", "zero3_offload", "zero2")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "heldout", "all")


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
    path: str = _path(None, help="required: HF model folder (config.json + weights)")
    tokenizer: Optional[str] = _path(None, help="tokenizer folder; null: the model folder")
    bos_token: Optional[str] = _opt(None, "BOS token text, for a tokenizer without a usable BOS")
    dtype: str = _choice("auto", ("auto", "fp32", "bf16", "fp16"),
                         "teacher weights; auto: bf16 on GPU, fp32 on CPU")


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


@dataclass
class DistillConfig:
    """The loss."""
    method: str = _choice("bld", ("ce", "token_kd", "uld", "bld"),
                          "ce: student alone; token_kd: token KL (same tokenizer); uld: sorted-probability L1; "
                          "bld: byte-level distillation")
    lambda_b: float = _opt(1.0, "bld: weight of the byte head's cross-entropy")
    lambda_kl: float = _opt(0.1, "weight of the teacher term (divergence, KL or L1) added to the token CE")
    divergence: str = _choice("forward_kl", ("forward_kl", "reverse_kl", "jsd", "tvd"),
                              "bld: divergence D(q || p_head) between teacher and byte-head distributions")
    beta: float = _opt(0.5, "divergence jsd: mixing weight")
    temperature: float = _opt(1.0, "temperature of teacher and student distributions in the divergence")
    conversion: str = _choice("cover", ("cover", "within_token", "exact"),
                              "bld: how teacher token probabilities become next-byte distributions")
    exact_chunk_tokens: int = _opt(16384, "conversion exact: query positions per tree forward (memory bound)")


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
class LoggingConfig:
    """Metrics beyond metrics.jsonl (always written)."""
    tensorboard: bool = _opt(True, "TensorBoard events in <output_dir>/tensorboard (needs the tensorboard package)")
    wandb_project: Optional[str] = _opt(None, "Weights & Biases project; null: no wandb")


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

    def validate_paths(self) -> "Recipe":
        """Refuse missing input files, naming the key and the path. Cheap: stats only."""
        _walk_paths(self, "", _check_exists)
        if self.deepspeed.config not in DS_CONFIG_NAMES and not Path(self.deepspeed.config).is_file():
            raise RecipeError(f"deepspeed.config: {self.deepspeed.config!r} is neither one of "
                              f"{list(DS_CONFIG_NAMES)} nor an existing JSON file")
        for key in ("teacher.path", "student.tokenizer"):
            if _get(self, key) is None:
                raise RecipeError(f"{key}: required, but not set")
        tp = Path(self.teacher.path)
        if tp.is_dir() and not (tp / "config.json").is_file():
            raise RecipeError(f"teacher.path: no config.json in {tp} (an HF model folder is expected)")
        if self.student.config is None:
            raise RecipeError("student.config: required (a config.json path or a dict)")
        if not self.data.train:
            raise RecipeError("data.train: required (files, globs or builtin:train)")
        return self

    def validate_attention(self) -> "Recipe":
        """Refuse a forced FlashAttention-2 this machine cannot run, before transformers fails on it."""
        if self.student.attn_implementation == "flash_attention_2":
            problem = flash_attention_problem()
            if problem is not None:
                raise RecipeError(
                    f"student.attn_implementation: flash_attention_2 needs the flash-attn package and a "
                    f"CUDA device, but {problem}; set student.attn_implementation=auto (FlashAttention-2 "
                    f"where available, else PyTorch SDPA) or install flash-attn on a GPU machine "
                    f"(pip install flash-attn --no-build-isolation)")
        return self


def flash_attention_problem() -> str | None:
    """Why FlashAttention-2 cannot run here (None: it can): flash_attn must import and CUDA be present.

    Lives here, not in bld_scale.model, so that recipe validation (the lowest layer) can ask too.
    An import, not just a package lookup: a flash_attn built for another torch is installed but
    fails to import, and must count as absent.
    """
    try:
        import flash_attn
    except ImportError as err:  # includes a wheel built for another torch (undefined symbol)
        if isinstance(err, ModuleNotFoundError) and err.name == "flash_attn":
            return "the flash_attn package is not installed"
        return f"flash_attn fails to import ({err})"
    version = str(getattr(flash_attn, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 2:
        return f"flash_attn {version} is installed (FlashAttention-2 needs version 2)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# ---------------------------------------------------------------------------------------------
# Help text


def recipe_keys_help() -> str:
    """Every recipe key with its type, default and meaning (the fields' `help`), for `--help`."""
    lines = ["recipe keys (in the --config YAML, or as dotted key=value overrides):"]
    _describe(Recipe, "", lines)
    return "\n".join(lines)


def _describe(cls, prefix: str, lines: list[str]) -> None:
    hints = _hints(cls)
    leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    for f in leaves:
        key = prefix + f.name
        kind = ("one of " + ", ".join(f.metadata["choices"]) if f.metadata.get("choices")
                else _type_name(hints[f.name]))
        lines.append(f"  {key} ({kind}; default {format_default(f)})")
        lines.append(f"      {f.metadata.get('help', '')}")  # tests/unit/test_distill_cli.py wants one
    for f in sections:
        section = hints[f.name]
        lines.append(f"{prefix}{f.name}: {(section.__doc__ or '').strip()}")
        _describe(section, prefix + f.name + ".", lines)


def format_default(f: dataclasses.Field) -> str:
    """A field's default as it would be written in a recipe (`null`, `true`, `[]`, `3.0e-4`...)."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (),
                *, check_paths: bool = True) -> Recipe:
    """Recipe from a YAML file (or the defaults) plus dotted `key=value` overrides.

    `check_paths`: also check what this machine must provide (input files exist; flash-attn and CUDA
    when `student.attn_implementation` is `flash_attention_2`); off for recipes meant for another
    machine (memory estimates on a login node).
    Override values are parsed as YAML scalars (`train.lr=1e-4`, `data.streaming=true`,
    `data.train=[a.txt, b.txt]`), except for plain string fields, which take the text verbatim.
    Raises RecipeError (a ValueError) on any problem, before heavy work.
    """
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: the recipe must be a mapping at top level, got {type(raw).__name__}")
        base = path.resolve().parent
    recipe = _build(Recipe, raw, "")
    _walk_paths(recipe, "", lambda key, v, meta: _resolve(v, meta, base))
    for item in overrides:
        apply_override(recipe, item)
    _check_values(recipe)
    if check_paths:
        recipe.validate_paths()
        recipe.validate_attention()
    return recipe


def apply_override(recipe: Recipe, item: str) -> None:
    """Apply one `a.b.c=value`; relative input paths in it resolve against the current directory."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    obj, prefix = recipe, ""
    for i, name in enumerate(parts):
        f = _field_named(type(obj), name, prefix)
        where = f"{prefix}{name}"
        if i < len(parts) - 1:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise RecipeError(f"override {key!r}: {where!r} is a value, not a section")
            prefix = where + "."
    tp = _hints(type(obj))[f.name]
    if dataclasses.is_dataclass(tp):
        raise RecipeError(f"override {key!r}: {key!r} is a section; set one of its keys "
                          f"({', '.join(_names(tp))})")
    if _strip_optional(tp) is str and text.strip() not in ("null", "~", ""):
        value: Any = text  # strings verbatim: `wandb_project=2024` stays "2024"
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"override {key!r}: cannot parse value {text!r}: {e}") from None
    value = _convert(value, tp, key, f)
    if f.metadata.get("path") or (isinstance(obj, DeepSpeedConfig) and value not in DS_CONFIG_NAMES):
        value = _resolve(value, f.metadata if f.metadata.get("path") else {"path": "input"}, Path.cwd())
    setattr(obj, f.name, value)


def recipe_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every key, paths as resolved) as YAML text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def save_resolved(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the fully resolved recipe (absolute paths, every default) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(recipe_yaml(recipe))


def recipe_from_dict(raw: dict) -> Recipe:
    """Typed recipe from a plain dict (e.g. a resolved recipe read back); paths taken as given."""
    recipe = _build(Recipe, raw, "")
    _check_values(recipe)
    return recipe


# ---------------------------------------------------------------------------------------------
# Internals: building, conversion, checks


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_named(cls, name: str, prefix: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        where = prefix.rstrip(".") or "top level"
        close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise RecipeError(f"unknown key {prefix + name!r}{hint}; valid keys at {where}: "
                          f"{', '.join(fields)}")
    return fields[name]


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping (section with keys "
                          f"{', '.join(_names(cls))}), got {type(raw).__name__} {raw!r}")
    hints, kwargs = _hints(cls), {}
    for name, value in raw.items():
        f = _field_named(cls, str(name), prefix)
        tp = hints[f.name]
        key = prefix + f.name
        kwargs[f.name] = _build(tp, {} if value is None else value, key + ".") if dataclasses.is_dataclass(tp) \
            else _convert(value, tp, key, f)
    return cls(**kwargs)


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str, f: dataclasses.Field | None = None) -> Any:
    """`value` as type `tp`, or RecipeError naming key, expected type and value."""
    def bad():
        return RecipeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, f)
            except RecipeError:
                pass
        raise bad()
    if origin is list:
        (inner,) = typing.get_args(tp)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value  # one file may be given bare
        if not isinstance(items, list):
            raise bad()
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # PyYAML reads `1e5` as a string (YAML 1.1 wants a dot); accept integral numbers in any spelling.
        num = _as_float(value)
        if num is not None and num.is_integer():
            return int(num)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        num = _as_float(value)  # `lr: 3e-4` arrives as the string '3e-4'
        if num is not None:
            return num
        raise bad()
    if tp is str:
        if isinstance(value, str):
            choices = f.metadata.get("choices") if f is not None else None
            if choices and value not in choices:
                close = difflib.get_close_matches(value, choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(f"{key}: invalid choice {value!r}{hint}; valid choices: "
                                  f"{', '.join(choices)}")
            return value
        raise bad()
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise bad()
    raise RecipeError(f"{key}: unsupported field type {tp}")  # a bug in this module, not the recipe


def _as_float(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _get(recipe: Recipe, key: str):
    obj = recipe
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _walk_paths(obj, prefix: str, fn) -> None:
    """Call fn(key, value, metadata) on each path field; a non-None return replaces the value."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _walk_paths(value, prefix + f.name + ".", fn)
        elif f.metadata.get("path") and value is not None:
            new = fn(prefix + f.name, value, f.metadata)
            if new is not None:
                setattr(obj, f.name, new)
    if isinstance(obj, DeepSpeedConfig) and obj.config not in DS_CONFIG_NAMES:
        # Names stay names; anything else is a path, resolved like an input.
        new = fn(prefix + "config", obj.config, {"path": "input", "must_exist": True, "glob": False,
                                                  "_ds": True})
        if new is not None:
            obj.config = new


def _resolve(value, meta: dict, base: Path):
    if isinstance(value, dict):  # student.config given inline
        return value
    if isinstance(value, list):
        return [_resolve(v, meta, base) for v in value]
    if value.startswith(BUILTIN_PREFIX):
        return value
    p = Path(os.path.expanduser(value))
    if meta.get("path") == "output":
        base = Path.cwd()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check_exists(key: str, value, meta: dict) -> None:
    if not meta.get("must_exist") or isinstance(value, dict):
        return
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        k = f"{key}[{i}]" if isinstance(value, list) else key
        if v.startswith(BUILTIN_PREFIX):
            if v[len(BUILTIN_PREFIX):] not in BUILTIN_SPLITS:
                raise RecipeError(f"{k}: unknown builtin corpus {v!r}; valid: "
                                  f"{', '.join(BUILTIN_PREFIX + s for s in BUILTIN_SPLITS)}")
        elif meta.get("glob") and glob.has_magic(v):
            if not glob.glob(v, recursive=True):
                raise RecipeError(f"{k}: no file matches the pattern {v}")
        elif not os.path.exists(v):
            raise RecipeError(f"{k}: path does not exist: {v}")


def _check_values(r: Recipe) -> None:
    """Ranges and cross-field rules that types cannot say."""
    rules = [
        ("student.K", r.student.K >= 1, "must be >= 1"),
        ("student.head_num_layers", r.student.head_num_layers >= 1, "must be >= 1"),
        ("data.window_bytes", r.data.window_bytes >= 1, "must be >= 1"),
        ("distill.lambda_b", r.distill.lambda_b >= 0, "must be >= 0"),
        ("distill.lambda_kl", r.distill.lambda_kl >= 0, "must be >= 0"),
        ("distill.beta", 0.0 <= r.distill.beta <= 1.0, "must be in [0, 1]"),
        ("distill.temperature", r.distill.temperature > 0, "must be > 0"),
        ("distill.exact_chunk_tokens", r.distill.exact_chunk_tokens >= 1, "must be >= 1"),
        ("train.max_steps", r.train.max_steps >= 1, "must be >= 1"),
        ("train.micro_batch_size", r.train.micro_batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", r.train.grad_accum >= 1, "must be >= 1"),
        ("train.lr", r.train.lr > 0, "must be > 0"),
        ("train.warmup_steps", r.train.warmup_steps >= 0, "must be >= 0"),
        ("train.min_lr_ratio", 0.0 <= r.train.min_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("train.weight_decay", r.train.weight_decay >= 0, "must be >= 0"),
        ("train.grad_clip", r.train.grad_clip >= 0, "must be >= 0 (0 disables)"),
        ("train.log_interval", r.train.log_interval >= 1, "must be >= 1"),
        ("train.eval_interval", r.train.eval_interval >= 0, "must be >= 0 (0 disables)"),
        ("checkpoint.interval", r.checkpoint.interval >= 0, "must be >= 0 (0 disables)"),
        ("checkpoint.keep", r.checkpoint.keep >= 1, "must be >= 1"),
        ("data.format", not (r.data.format != "text" and any(
            t.startswith(BUILTIN_PREFIX) for t in r.data.train + r.data.heldout)),
         "builtin corpora are text; use format: text"),
    ]
    for key, ok, msg in rules:
        if not ok:
            raise RecipeError(f"{key}: {msg}, got {_get(r, key)!r}")
