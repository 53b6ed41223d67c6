#!/usr/bin/env python
"""Train the two demo tokenizers the project ships, from the corpus's training works only.

* TEACHER: a GPT-2-style byte-level BPE (4,096 ids, `<|endoftext|>` as BOS and EOS), saved as a
  Hugging Face tokenizer folder in `bld_scale/assets/demo/teacher/` (the teacher model is saved next
  to it later by `tools/train_demo_teacher.py`).
* STUDENT: a Llama-style SentencePiece BPE with byte fallback (2,048 pieces), another tokenizer
  family on purpose, so that distilling between them really crosses tokenizers. Saved as
  `bld_scale/assets/demo/student_tokenizer/tokenizer.model` together with the Hugging Face files
  `save_pretrained` writes for it.

Held-out works (`bld_scale.corpus.HELDOUT_WORKS`) are never read for training: held-out bits per
byte are only meaningful on text neither tokenizer nor model saw.

Both trainers are deterministic (SentencePiece with one thread; the `tokenizers` BPE trainer breaks
count ties by the pair itself), which `--check-determinism` verifies by training twice and
comparing the files byte for byte. Every tokenizer is also checked byte-exact on every work.

    python tools/train_demo_tokenizers.py [--check-determinism]
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from bld_scale.data.corpus import HELDOUT_WORKS, load_works
from bld_scale.demo import DEMO_DIR
from bld_scale.tokenize.token_bytes import TokenBytes
from bld_scale.tokenize.zoo import save_sentencepiece, train_byte_level_bpe, train_sentencepiece

TEACHER_VOCAB = 4096
STUDENT_VOCAB = 2048
TEACHER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SAMPLE = "Now is the winter of our discontent\nMade glorious summer by this sun of York;  3 ducats!"


def training_texts() -> list[str]:
    works = load_works("train")
    # Belt and braces: the split is by file, but the guarantee matters enough to assert it here.
    assert not set(works) & set(HELDOUT_WORKS), "held-out works leaked into the training split"
    return list(works.values())  # load_works sorts by name, so the order is fixed


def train_teacher_tokenizer(texts: list[str], out: Path) -> None:
    tok = train_byte_level_bpe(texts, vocab_size=TEACHER_VOCAB, special_tokens=("<|endoftext|>",))
    # A causal LM tokenizer: BOS, EOS and padding are all <|endoftext|>, as for GPT-2.
    tok.pad_token = tok.eos_token
    out.mkdir(parents=True, exist_ok=True)
    # Replace only the tokenizer files here: teacher/ also holds the model, kept if present.
    for name in TEACHER_TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    tok.save_pretrained(out)
    written = sorted(p.name for p in out.iterdir() if p.name.startswith("tokenizer") or p.name.endswith("tokens_map.json"))
    assert set(written) <= set(TEACHER_TOKENIZER_FILES), written


def train_student_tokenizer(texts: list[str], out: Path) -> None:
    sp = train_sentencepiece(texts, vocab_size=STUDENT_VOCAB)
    # Start from an empty folder: the files of an earlier run must not leak into this one.
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_sentencepiece(sp, out / "tokenizer.model")
    # Hugging Face's LlamaTokenizer converts tokenizer.model offline; saving it once writes the
    # tokenizer_config.json / tokenizer.json that AutoTokenizer needs to pick the right class.
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(out))
    hf.save_pretrained(out)


def verify(teacher_dir: Path, student_dir: Path) -> None:
    """Both tokenizers load offline and are byte-exact on every training and held-out work."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(str(teacher_dir))
    student = AutoTokenizer.from_pretrained(str(student_dir))
    sp = spm.SentencePieceProcessor(model_file=str(student_dir / "tokenizer.model"))
    assert len(teacher) == TEACHER_VOCAB, len(teacher)
    assert teacher.bos_token == teacher.eos_token == "<|endoftext|>"
    assert sp.get_piece_size() == STUDENT_VOCAB

    works = load_works("all")
    for label, tok in [("teacher (HF)", teacher), ("student (HF)", student), ("student (sp)", sp)]:
        table = TokenBytes.from_tokenizer(tok, name=label)
        n_tokens = n_bytes = 0
        for name, text in works.items():
            ids, spans = table.encode(text)  # raises if the tokens do not rebuild the text
            assert spans[-1][1] == len(text.encode("utf-8")), name
            n_tokens += len(ids)
            n_bytes += spans[-1][1]
        print(f"  {label}: byte-exact on all {len(works)} works, {n_bytes / n_tokens:.2f} bytes/token")

    # The Hugging Face conversion of the SentencePiece model must tokenize exactly like it.
    for text in [SAMPLE, works["hamlet"][:20000], works["tempest"][5000:15000]]:
        hf_ids = student.encode(text, add_special_tokens=False)
        sp_ids = sp.encode(text, out_type=int)
        assert hf_ids == sp_ids, "the Hugging Face student tokenizer differs from sentencepiece"
    print("  student: Hugging Face ids == sentencepiece ids on the samples")


def train_all(out_dir: Path) -> tuple[Path, Path]:
    texts = training_texts()
    teacher_dir, student_dir = out_dir / "teacher", out_dir / "student_tokenizer"
    print(f"training the teacher byte-level BPE ({TEACHER_VOCAB} ids) -> {teacher_dir}")
    train_teacher_tokenizer(texts, teacher_dir)
    print(f"training the student SentencePiece ({STUDENT_VOCAB} pieces) -> {student_dir}")
    train_student_tokenizer(texts, student_dir)
    return teacher_dir, student_dir


def same_tree(a: Path, b: Path) -> list[str]:
    """Names of files that differ between two folders (or exist in only one)."""
    cmp = filecmp.dircmp(a, b)
    diff = list(cmp.left_only) + list(cmp.right_only)
    diff += [f for f in cmp.common_files if not filecmp.cmp(a / f, b / f, shallow=False)]
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="demo folder (default: the shipped one)")
    parser.add_argument("--check-determinism", action="store_true",
                        help="train a second time in a temporary folder and compare every file")
    args = parser.parse_args()

    # Only the tokenizer files are replaced; a teacher model saved in teacher/ stays.
    teacher_dir, student_dir = train_all(args.out)
    print("verifying")
    verify(teacher_dir, student_dir)

    if args.check_determinism:
        with tempfile.TemporaryDirectory() as tmp:
            again_teacher, again_student = train_all(Path(tmp))
            tok_files = [p.name for p in again_teacher.iterdir()]
            # Compare only the tokenizer files: teacher/ may also hold the model.
            diff = [f for f in tok_files
                    if not filecmp.cmp(teacher_dir / f, again_teacher / f, shallow=False)]
            diff += same_tree(student_dir, again_student)
            if diff:
                sys.exit(f"NOT deterministic: files differ between two runs: {diff}")
            print(f"deterministic: two trainings gave identical files "
                  f"({sorted(tok_files)} and {sorted(p.name for p in again_student.iterdir())})")
    shutil.rmtree(args.out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
