"""`recipe_keys_help`: every recipe key with its type, default and one-line help, for `--help`."""
from __future__ import annotations

import dataclasses

import yaml

from bld_scale.config.loading import _hints, _type_name
from bld_scale.config.schema import Recipe


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

