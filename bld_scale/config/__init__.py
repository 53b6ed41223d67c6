"""The typed distillation recipe, one concern per module:

- schema.py: RecipeError, the constants and the dataclasses (each key with its one-line help);
- loading.py: YAML + dotted overrides into the dataclasses, type conversion, the resolved recipe out;
- checks.py: paths exist, values in range, what this machine must provide (flash-attn, CUDA);
- kernels.py: what the student's Liger Kernel options need (the package, CUDA or the Triton interpreter);
- keys_help.py: every key with type, default and help, for `launch/distill.py --help`.

Import from here (`from bld_scale.config import load_recipe`).
"""
from bld_scale.config.checks import flash_attention_problem, validate_attention, validate_paths
from bld_scale.config.kernels import liger_problem, validate_liger
from bld_scale.config.keys_help import format_default, recipe_keys_help
from bld_scale.config.loading import apply_override, load_recipe, recipe_from_dict, recipe_yaml, save_resolved
from bld_scale.config.schema import (BUILTIN_PREFIX, BUILTIN_SPLITS, DS_CONFIG_DIR, DS_CONFIG_NAMES, REPO_ROOT,
                                     CheckpointConfig, DataConfig, DeepSpeedConfig, DistillConfig, LoggingConfig, ParallelConfig,
                                     Recipe, RecipeError, StudentConfig, TeacherConfig, TrainConfig)

__all__ = [
    "BUILTIN_PREFIX", "BUILTIN_SPLITS", "DS_CONFIG_DIR", "DS_CONFIG_NAMES", "REPO_ROOT",
    "CheckpointConfig", "DataConfig", "DeepSpeedConfig", "DistillConfig", "LoggingConfig", "ParallelConfig", "Recipe",
    "RecipeError", "StudentConfig", "TeacherConfig", "TrainConfig",
    "apply_override", "flash_attention_problem", "format_default", "load_recipe", "recipe_from_dict",
    "recipe_keys_help", "recipe_yaml", "save_resolved", "validate_attention", "validate_paths",
    "liger_problem", "validate_liger",
]
