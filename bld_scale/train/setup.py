"""Building a run's parts from its recipe: tokenizers, teacher engine, student model, seeds.

Each function does one thing so that the pipeline, tests and tools (tools/measure_students.py,
tools/estimate_memory.py) build them alike.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bld_scale.config import Recipe, RecipeError
from bld_scale.data.batch import resolve_bos
from bld_scale.model.student import build_student
from bld_scale.tokenize.token_bytes import TokenBytes
from bld_scale.train.step import check_same_tokenizer
from bld_scale.train.teacher_tokenizer import TokenizerError, check_teacher_tokenizer


@dataclass
class Sides:
    """The teacher's and the student's tokenizers, as loaded and as byte tables, with their BOS ids."""
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


TEACHER_CACHE = "teacher_hf"  # <output_dir>/teacher_hf/<sha256 of the .gguf>/: a .gguf teacher, converted


def teacher_section(recipe: Recipe):
    """recipe.teacher with `path` an HF folder: as given, or for a .gguf file its conversion (once
    per file content, into <output_dir>/teacher_hf/). The recipe keeps the .gguf path, so the
    checkpoint identity fingerprints the file itself."""
    from bld_scale.model.gguf import cached_hf_folder, is_gguf_file

    if not is_gguf_file(recipe.teacher.path):
        return recipe.teacher
    folder = cached_hf_folder(recipe.teacher.path, Path(recipe.output_dir) / TEACHER_CACHE)
    return dataclasses.replace(recipe.teacher, path=str(folder))


def load_teacher_config(recipe: Recipe):
    """The teacher's config (config.json only, no weights): its rows and special ids are checked
    against the tokenizer before the model loads."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(teacher_section(recipe).path)


def setup_tokenizers(recipe: Recipe, teacher_vocab_size: int, log=print, teacher_config=None) -> Sides:
    """Both tokenizers, as loaded and as byte tables. A teacher tokenizer that is not the teacher
    model's is refused (`train.teacher_tokenizer`: sizes, and with `teacher_config` special ids);
    so is any other tokenizer problem (TokenizerError, a ValueError, naming the recipe key)."""
    from transformers import AutoTokenizer

    teacher = teacher_section(recipe)
    t_tok = AutoTokenizer.from_pretrained(teacher.tokenizer or teacher.path)
    s_tok = AutoTokenizer.from_pretrained(recipe.student.tokenizer)
    check_teacher_tokenizer(teacher, t_tok, teacher_vocab_size, teacher_config, log)
    try:
        t_vocab = TokenBytes.from_tokenizer(t_tok, vocab_size=teacher_vocab_size,
                                            name=f"teacher tokenizer ({recipe.teacher.path})")
        s_vocab = TokenBytes.from_tokenizer(s_tok, name=f"student tokenizer ({recipe.student.tokenizer})")
        t_bos, t_src = resolve_bos(t_tok, recipe.teacher.bos_token)
        s_bos, s_src = resolve_bos(s_tok)
        if recipe.distill.method == "token_kd":
            check_same_tokenizer(t_vocab, s_vocab)
    except ValueError as err:
        if type(err) is not ValueError:  # already a named refusal (e.g. a data or recipe error)
            raise
        raise TokenizerError(str(err)) from err
    log(f"teacher BOS id {t_bos} ({t_src}); student BOS id {s_bos} ({s_src})")
    return Sides(t_tok, s_tok, t_vocab, s_vocab, t_bos, s_bos, getattr(t_tok, "eos_token_id", None))


def _torch_dtype(name: str):
    from bld_scale.parallel.engines import resolve_precision

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(name)]


def setup_teacher(recipe: Recipe, ds_config: dict, placement: str = "zero3", device=None):
    """The frozen teacher as a ZeRO-3 inference engine (HF loads it shard by shard under ZeRO-3),
    or with `placement` "replicate" whole on `device` (`bld_scale.parallel.placement`)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from bld_scale.parallel.engines import build_teacher_engine

    if placement == "replicate":
        from bld_scale.parallel.placement import replicate_teacher

        device = device if device is not None else torch.device("cpu")
        # straight onto the device: each rank of a node holding a whole copy in host memory first
        # (8 x 16 GB for an 8B teacher) is what this avoids
        model = AutoModelForCausalLM.from_pretrained(teacher_section(recipe).path, dtype=_torch_dtype(recipe.teacher.dtype),
                                                     device_map={"": device})
        return replicate_teacher(model, device)
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build under zero.Init
    model = AutoModelForCausalLM.from_pretrained(teacher_section(recipe).path, dtype=_torch_dtype(recipe.teacher.dtype))
    engine = build_teacher_engine(model, ds_config)
    del keep_alive
    return engine


def teacher_placement(recipe: Recipe, world: int, teacher_config, student_vocab_size: int, device, log=print):
    """`teacher.placement` resolved for this run (`bld_scale.parallel.placement`), and logged with why."""
    from bld_scale.parallel.placement import placement_for

    student = {**student_config_dict(recipe), "vocab_size": student_vocab_size}
    placement = placement_for(recipe, world, teacher_config, student, device)
    log(f"teacher placement: {placement.name} ({placement.reason})")
    return placement


def student_config_dict(recipe: Recipe) -> dict:
    """student.config as a dict (the recipe gives it inline or as a JSON file), vocab_size not filled."""
    config = recipe.student.config
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    return dict(config)


def setup_student(recipe: Recipe, vocab_size: int, teacher_config=None):
    """The recipe's student; `distill.method: dskd` adds its projectors, sized by `teacher_config`."""
    s = recipe.student
    config = student_config_dict(recipe)
    if config.get("vocab_size") not in (None, vocab_size):
        raise RecipeError(f"student.config has vocab_size={config['vocab_size']} but the student "
                         f"tokenizer has {vocab_size} ids: remove vocab_size from the config (it is "
                         "filled from the tokenizer) or use the matching tokenizer")
    config["vocab_size"] = vocab_size
    head_size = {}
    if s.head == "causal":
        head_size = {"width": s.head_hidden_size or config.get("hidden_size"), "layers": s.head_num_layers}
    teacher_hidden = None
    if recipe.distill.method == "dskd":
        if teacher_config is None:
            raise ValueError("distill.method dskd sizes its projectors by the teacher: pass teacher_config")
        teacher_hidden = teacher_config.get_text_config().hidden_size
    student = build_student(config, head_kind=s.head, K=s.K, attn_implementation=student_attention(recipe),
                            head_size=head_size, teacher_hidden_size=teacher_hidden)
    setup_liger(student, recipe)
    if recipe.train.activation_checkpointing:
        from bld_scale.model.recompute import enable_activation_checkpointing

        enable_activation_checkpointing(student)
    return student


def setup_liger(student, recipe: Recipe) -> None:
    """student.liger_layers / student.liger_fused_ce: Liger's kernels in the student's layers, and the
    check that its head can be fused into the CE (refusals name the key)."""
    from bld_scale.model.fused_loss import check_fusable
    from bld_scale.model.liger_layers import apply_liger_layers

    if recipe.student.liger_layers:
        apply_liger_layers(student.lm)
    if recipe.student.liger_fused_ce:
        check_fusable(student.lm)


def student_attention(recipe: Recipe) -> str:
    """The recipe's attention choice; `auto` never picks FlashAttention-2 for an fp32 run (its
    kernels take fp16/bf16 only), SDPA runs every precision."""
    from bld_scale.parallel.engines import resolve_precision

    requested = recipe.student.attn_implementation
    if requested == "auto" and resolve_precision(recipe.train.precision) == "fp32":
        return "sdpa"
    return requested
