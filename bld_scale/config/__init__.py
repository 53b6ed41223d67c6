"""Typed distillation recipe (see bld_scale/config/schema.py)."""
from bld_scale.config.schema import (  # noqa: F401
    BUILTIN_PREFIX, BUILTIN_SPLITS, DS_CONFIG_DIR, DS_CONFIG_NAMES, REPO_ROOT, CheckpointConfig, DataConfig,
    DeepSpeedConfig, DistillConfig, LoggingConfig, Recipe, RecipeError, StudentConfig, TeacherConfig,
    TrainConfig, apply_override, flash_attention_problem, format_default, load_recipe, recipe_from_dict,
    recipe_keys_help, recipe_yaml, save_resolved)
