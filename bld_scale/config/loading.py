"""Loading a recipe: YAML file + dotted `key=value` overrides into the typed dataclasses, every
value converted to its field's type or refused naming the key; and writing the resolved recipe back.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from bld_scale.config.checks import _check_values, _resolve, _walk_paths, validate_attention, validate_paths
from bld_scale.config.kernels import validate_liger
from bld_scale.config.schema import DS_CONFIG_NAMES, DeepSpeedConfig, Recipe, RecipeError


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
        validate_paths(recipe)
        validate_attention(recipe)
        validate_liger(recipe)
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
# Internals: building and type conversion


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
