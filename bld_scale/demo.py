"""The demo assets the project ships: a small teacher LM and a student tokenizer of another family.

* `bld_scale/assets/demo/teacher/`: a Hugging Face `LlamaForCausalLM` (a few million parameters)
  with its GPT-2-style byte-level BPE tokenizer (4,096 ids, `<|endoftext|>` as BOS/EOS), made by
  `tools/train_demo_tokenizers.py` then `tools/train_demo_teacher.py`; `TRAINING.json` records how.
* `bld_scale/assets/demo/student_tokenizer/`: a Llama-style SentencePiece (2,048 pieces, byte
  fallback) as `tokenizer.model` plus the Hugging Face files, made by
  `tools/train_demo_tokenizers.py`.

All were trained on the corpus's training works only (`bld_scale.corpus`), so the held-out works
measure text they never saw. Everything loads offline.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
TEACHER_DIR = DEMO_DIR / "teacher"
STUDENT_TOKENIZER_DIR = DEMO_DIR / "student_tokenizer"

_TOKENIZER_TOOL = "python tools/train_demo_tokenizers.py"
_TEACHER_TOOL = "python tools/train_demo_teacher.py"


def _require(folder: Path, files: list[str], tools: list[str]) -> Path:
    """`folder`, after checking that the shipped `files` are there; else say how to make them."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo assets missing in {folder}: {', '.join(missing)}. They ship with the package; "
            f"in a source checkout, regenerate them with: {' && '.join(tools)}")
    return folder


def demo_teacher_path() -> Path:
    """Folder of the demo teacher (model + tokenizer), for `from_pretrained`."""
    return _require(TEACHER_DIR, ["config.json", "model.safetensors", "tokenizer_config.json"],
                    [_TOKENIZER_TOOL, _TEACHER_TOOL])


def demo_student_tokenizer_path() -> Path:
    """Folder of the demo student tokenizer (`tokenizer.model` + Hugging Face files)."""
    return _require(STUDENT_TOKENIZER_DIR, ["tokenizer.model", "tokenizer_config.json"],
                    [_TOKENIZER_TOOL])


def load_demo_teacher(dtype=None):
    """(model, tokenizer) of the demo teacher, model in eval mode on the CPU (fp32 by default)."""
    path = demo_teacher_path()  # checked before the (slow) transformers import
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_demo_student_tokenizer():
    """The demo student tokenizer as a Hugging Face tokenizer (Llama-style SentencePiece)."""
    path = demo_student_tokenizer_path()  # checked before the (slow) transformers import
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_demo_student_sentencepiece():
    """The same student tokenizer as a `sentencepiece.SentencePieceProcessor`."""
    import sentencepiece as spm

    path = demo_student_tokenizer_path() / "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path))
