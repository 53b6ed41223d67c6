"""The student on disk: its rebuild files, the finished Hugging Face folder, and its tokenizer.

- `write_student_files(student, tokenizer, folder)`: config.json, byte_head.json and the tokenizer,
  no weights. A checkpoint keeps them beside its ZeRO shards (`student/`) so that
  tools/export_hf.py rebuilds the student without the recipe: `student_from_files(folder)`, then
  `load_full_state(student, state)` with the consolidated weights.
- `save_hf_folder(student, tokenizer, folder)`: `config.json`, `model.safetensors`,
  `generation_config.json`, the tokenizer, and `byte_head.safetensors` + `byte_head.json` beside
  them: `AutoModelForCausalLM` / `AutoTokenizer` load it offline, `load_student` loads both parts.
- `student_holding(like, state)`: a student that holds a gathered state dict's tensors (built on the
  meta device, nothing copied), for `save_hf_folder`: how a run writes final/ from its live engine
  (`train.pipeline.Pipeline.save_final` with `parallel.consolidate.full_fp32_state`).
- `save_tokenizer(tokenizer, folder)`: saved so that its default encoding is the one the student
  was trained on, `[BOS] + text`: training puts `data.batch.resolve_bos`'s id in front of every
  window, while a tokenizer such as the demo's SentencePiece Llama one adds nothing by default.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from bld_scale.data.batch import resolve_bos
from bld_scale.model.heads import HEAD_CONFIG_FILE, build_byte_head
from bld_scale.model.student import Student, save_student

BOS_PROBE = "Byte-level distillation, 2 tokenizers."  # any text: checks what the encoding adds around it


def _adds_training_bos(tokenizer, bos_id: int) -> bool:
    plain = tokenizer(BOS_PROBE, add_special_tokens=False)["input_ids"]
    return tokenizer(BOS_PROBE)["input_ids"] == [bos_id] + list(plain)


def _prepend_bos(tokenizer, bos_id: int) -> None:
    """Make the (fast) tokenizer's post-processor put `bos_id` before a text (and each of a pair)."""
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no Rust backend (tokenizer.json) whose "
                         "post-processor could add the BOS the student was trained with; save a fast "
                         "tokenizer (AutoTokenizer loads one from tokenizer.json) as student.tokenizer")
    token = tokenizer.convert_ids_to_tokens(bos_id)
    template = processors.TemplateProcessing(single=f"{token}:0 $A:0", pair=f"{token}:0 $A:0 {token}:1 $B:1",
                                             special_tokens=[(token, bos_id)])
    current = backend.post_processor
    keep = current is not None and not isinstance(current, processors.TemplateProcessing)
    # a byte-level post-processor (offsets) is kept; a template is replaced, it decides what is added
    backend.post_processor = processors.Sequence([current, template]) if keep else template


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)`, reloaded from `folder` encoding `[BOS] + text` by default.

    `tokenizer` itself is not changed (training encodes without special tokens and adds BOS itself).
    """
    from transformers import AutoTokenizer

    bos_id, _ = resolve_bos(tokenizer)
    tokenizer.save_pretrained(folder)
    saved = AutoTokenizer.from_pretrained(folder)
    if _adds_training_bos(saved, bos_id):
        return
    _prepend_bos(saved, bos_id)
    saved.save_pretrained(folder)
    if not _adds_training_bos(AutoTokenizer.from_pretrained(folder), bos_id):
        raise RuntimeError(f"the tokenizer saved in {folder} does not put BOS id {bos_id} before a text "
                           "although its post-processor was set to")


def head_description(head) -> dict:
    """byte_head.json's content: what `build_byte_head` needs to rebuild the head."""
    return {"kind": head.kind, "hidden_size": head.hidden_size, "K": head.K, "size": head.size_config()}


def write_student_files(student: Student, tokenizer, folder: str | os.PathLike) -> None:
    """Config, tokenizer and byte-head description: enough to rebuild the student from shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    student.lm.config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    (folder / HEAD_CONFIG_FILE).write_text(json.dumps(head_description(student.byte_head), indent=2))


def student_from_files(folder: str | os.PathLike) -> tuple[Student, object]:
    """A student built from `write_student_files`' folder (fresh fp32 weights), and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head_cfg = json.loads((folder / HEAD_CONFIG_FILE).read_text())
    head = build_byte_head(head_cfg["kind"], head_cfg["hidden_size"], head_cfg["K"], **head_cfg.get("size", {}))
    return Student(lm, head), AutoTokenizer.from_pretrained(folder)


def load_full_state(student: Student, state: dict, where: str = "checkpoint", assign: bool = False) -> None:
    """Load a whole-model state dict (a tied lm_head may be absent: it is the embedding).

    `assign=True`: the student keeps `state`'s tensors themselves (no copy; see `student_holding`).
    DSKD's projectors (`projectors.*`, training machinery) are left out when `student` has none:
    the exported student is the LM and its byte head.
    """
    if student.projectors is None:
        state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    missing, unexpected = student.load_state_dict(state, strict=False, assign=assign)
    ties = student.lm.config.get_text_config().tie_word_embeddings
    tied = {k for k in missing if ties and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{where}: checkpoint does not fit the saved student config: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied or (assign and ties):  # assigning gives each name its own Parameter: one again
        student.lm.tie_weights()


def student_holding(like: Student, state: dict) -> Student:
    """A CPU student of `like`'s architecture whose weights are `state`'s tensors, not copies.

    Built on the meta device (no memory, no initialisation), then `state` assigned: saving the
    result (`save_hf_folder`) costs no second copy of the model. `like` may be a ZeRO-3-partitioned
    module: only its config and head description are read. Buffers outside the state dict (rotary
    frequencies) stay on the meta device: this student is for saving, not for running.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(like.lm.config)  # save_pretrained writes into its model's config
    head = head_description(like.byte_head)
    with torch.device("meta"):
        # eager: this copy never runs, and FlashAttention-2 (maybe the run's) refuses fp32 weights
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        byte_head = build_byte_head(head["kind"], head["hidden_size"], head["K"], **head["size"])
    student = Student(lm, byte_head)
    load_full_state(student, state, where="the gathered weights", assign=True)
    return student


def save_hf_folder(student: Student, tokenizer, folder: str | os.PathLike, byte_head: bool = True) -> Path:
    """The student as a Hugging Face folder, its byte head beside it unless `byte_head=False`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if byte_head:
        save_student(student, folder)
    else:
        student.lm.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder
