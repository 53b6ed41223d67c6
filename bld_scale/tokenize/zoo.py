"""Real tokenizers available offline, and locally trained ones.

* `tekken()` - Mistral's Tekken vocabulary (131,072 ids, tiktoken-style byte-level BPE) from the
  PyPI package `mistral-common`, as a `tiktoken.Encoding` with Mistral's id layout: 1,000 special
  ids first, then the byte-level ranks.
* `mistral_sentencepiece()` - Mistral-7B v0.1's SentencePiece model (32,000 pieces, byte fallback)
  from the same package, as a `sentencepiece.SentencePieceProcessor`, and `mistral_hf()` the same
  model through Hugging Face (`LlamaTokenizer`, converted offline).
* `train_byte_level_bpe(texts, vocab_size)` - a GPT-2-style byte-level BPE trained with
  `tokenizers`, wrapped as a Hugging Face tokenizer.
* `train_sentencepiece(texts, vocab_size)` - a Llama-style SentencePiece model with byte fallback.
Nothing here touches the network.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable

TEKKEN_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]"}


def _mistral_data_dir() -> Path:
    try:
        import mistral_common
    except ImportError as err:  # pragma: no cover - in requirements-dev
        raise ImportError("the real Mistral vocabularies come from the PyPI package "
                          "'mistral-common': pip install mistral-common") from err
    return Path(mistral_common.__file__).parent / "data"


@lru_cache(maxsize=None)
def tekken():
    """Tekken (tekken_240911.json) as a tiktoken.Encoding of 131,072 ids."""
    import tiktoken

    spec = json.loads((_mistral_data_dir() / "tekken_240911.json").read_text())
    config = spec["config"]
    n_special = config["default_num_special_tokens"]
    n_ranks = config["default_vocab_size"] - n_special
    # Offsetting every rank by the same constant keeps the merge order, so ids match Mistral's.
    ranks = {base64.b64decode(entry["token_bytes"]): entry["rank"] + n_special
             for entry in spec["vocab"][:n_ranks]}
    specials = {TEKKEN_SPECIALS.get(i, f"<SPECIAL_{i}>"): i for i in range(n_special)}
    return tiktoken.Encoding(name="tekken_240911", pat_str=config["pattern"],
                             mergeable_ranks=ranks, special_tokens=specials)


def mistral_sentencepiece_path() -> Path:
    return _mistral_data_dir() / "tokenizer.model.v1"


@lru_cache(maxsize=None)
def mistral_sentencepiece():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(mistral_sentencepiece_path()))


@lru_cache(maxsize=None)
def mistral_hf():
    """Mistral-7B v0.1's tokenizer through Hugging Face (LlamaTokenizer from tokenizer.model)."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_sentencepiece_path(), Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 2048, special_tokens=("<|endoftext|>",)):
    """A GPT-2-style byte-level BPE trained on `texts`, as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos = special_tokens[0] if special_tokens else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 1024, model_type: str = "bpe",
                        **options):
    """A Llama-style SentencePiece model (byte fallback, identity normaliser, dummy prefix)."""
    import sentencepiece as spm

    model = io.BytesIO()
    settings = dict(vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    add_dummy_prefix=True, split_digits=True, character_coverage=1.0,
                    max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
                    bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    settings.update(options)
    # SentencePiece trains on lines; blank lines carry nothing.
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **settings)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def save_sentencepiece(sp, path: str | os.PathLike) -> None:
    Path(path).write_bytes(sp.serialized_model_proto())
