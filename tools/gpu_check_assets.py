"""What tools/gpu_check.py measures on: vocabularies, tokenizer folders, model shapes, text, peaks.

Everything is made offline, here, from what the package ships:

* The teacher's vocabulary (`teacher_ranks`): Mistral's Tekken (131,072 ids, from the PyPI
  package `mistral-common`) when it imports, else a synthetic byte-level BPE of the requested
  size: a BPE trained on the shipped training works (which stops near 46k tokens: the corpus runs
  out of pairs), extended with merges of random pairs of its tokens until the size is reached.
  Either way it is a map `bytes -> id` (`ranks`, lower id = earlier merge) plus special tokens.
* `write_bpe_tokenizer` turns such ranks into a Hugging Face fast tokenizer folder (byte-level
  BPE; the merges are every split of a token into two tokens, ranked by the token's id, which is
  tiktoken's own rule, so Tekken's folder encodes as tiktoken does), for the pipeline's
  `AutoTokenizer`.
* The student's tokenizer: a byte-level BPE trained on the shipped training works.
* Model shapes: Qwen2-1.5B (teacher) and Llama-3.2-1B (student) as configs, random init; tiny
  ones for `--small`.
* Dense bf16 peak FLOP/s by GPU name, for the MFU (`bld_scale.train.throughput`, re-exported).
"""
from __future__ import annotations

import platform
import random
from dataclasses import dataclass
from pathlib import Path

from bld_scale.train.throughput import PEAK_BF16_TFLOPS, peak_bf16_tflops  # noqa: F401 - the MFU's peaks, re-exported

SYNTHETIC_MAX_TOKEN_BYTES = 16  # synthetic merges stay within the length of real long tokens
SYNTHETIC_SEED = 1234
GPT2_EOT = "<|endoftext|>"


# ---------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Profile:
    """The sizes of one gpu_check run (`FULL` on a GPU, `SMALL` for `--small`)."""
    name: str
    conv_batch: int  # (a): B
    conv_length: int  # (a): L teacher tokens per sequence
    dp_length: int  # (a): tokens of the short sequence for max |dp|
    teacher_rows: int  # teacher model's vocabulary rows (its logits' V)
    synthetic_tokens: int  # size of the synthetic teacher vocabulary, when Tekken is not used
    synthetic_trained: int | None  # ids of the synthetic vocabulary trained (None: as many as the text gives)
    synthetic_train_chars: int | None  # characters of each work the synthetic BPE trains on (None: all)
    student_tokens: int  # student tokenizer size
    student_train_chars: int | None
    teacher_config: dict
    student_config: dict  # vocab_size filled from the student tokenizer
    windows: int  # (b), (c): windows per step
    window_bytes: int
    steps: int  # (c): first run
    resume_steps: int  # (c): the resumed run goes on to here
    repeats: int  # timed repeats (median) after warmup
    warmup: int
    launch_timeout_s: int  # (c): per launch


QWEN2_1_5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
LLAMA_3_2_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)

FULL = Profile(name="full", conv_batch=8, conv_length=4096, dp_length=256, teacher_rows=151_936,
               synthetic_tokens=151_646, synthetic_trained=None, synthetic_train_chars=None, student_tokens=32_000,
               student_train_chars=None, teacher_config=QWEN2_1_5B, student_config=LLAMA_3_2_1B,
               windows=4, window_bytes=8192, steps=10, resume_steps=12, repeats=3, warmup=1,
               launch_timeout_s=420)
SMALL = Profile(name="small", conv_batch=2, conv_length=256, dp_length=64, teacher_rows=2_048,
                synthetic_tokens=2_000, synthetic_trained=1_500, synthetic_train_chars=60_000, student_tokens=1_024,
                student_train_chars=60_000,
                teacher_config=dict(QWEN2_1_5B, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
                student_config=dict(LLAMA_3_2_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
                windows=4, window_bytes=512, steps=10, resume_steps=12, repeats=2, warmup=1,
                launch_timeout_s=240)


# ---------------------------------------------------------------------- text
def training_texts(max_chars: int | None = None) -> list[str]:
    """The shipped training works (each cut to `max_chars` when given)."""
    from bld_scale.data.corpus import load_works

    works = [text for _, text in sorted(load_works("train").items())]
    return [t[:max_chars] for t in works] if max_chars else works


def training_windows(n: int, window_bytes: int, skip: int = 16) -> list[str]:
    """`n` consecutive windows of `window_bytes` from the training works (past their headers)."""
    from bld_scale.data.batch import split_windows

    windows = split_windows("\n".join(training_texts()), window_bytes)
    return windows[skip: skip + n]


# ---------------------------------------------------------------------- vocabularies
@dataclass
class Ranks:
    """A byte-level BPE vocabulary: token bytes -> id (merge order), specials, pre-tokenizer regex."""
    source: str  # "tekken" or "synthetic"
    ranks: dict  # bytes -> id
    specials: dict  # text -> id
    bos: str
    eos: str
    pattern: str | None  # tiktoken-style pre-tokenizer regex; None: GPT-2's (ByteLevel's own)
    note: str

    @property
    def size(self) -> int:
        return max([*self.ranks.values(), *self.specials.values()]) + 1


def tekken_available() -> bool:
    import importlib

    try:
        for name in ("mistral_common", "tiktoken"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def tekken_ranks() -> Ranks:
    """Tekken's ranks and specials, read through its public tiktoken.Encoding."""
    from bld_scale.tokenize.zoo import tekken

    enc = tekken()
    specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    pattern = getattr(enc, "_pat_str", None)  # the regex tiktoken splits with (no public accessor)
    return Ranks("tekken", ranks, specials, bos="<s>", eos="</s>", pattern=pattern,
                 note=f"Tekken (mistral-common), {enc.n_vocab:,} ids")


def synthetic_ranks(size: int, trained: int | None = None, train_chars: int | None = None,
                    seed: int = SYNTHETIC_SEED) -> Ranks:
    """A byte-level BPE trained on the shipped works (to `trained` ids at most, each work cut to
    `train_chars`), padded with merges of random pairs of its tokens to `size` ids."""
    from bld_scale.tokenize.token_bytes import byte_level_decoder_table
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    tok = train_byte_level_bpe(training_texts(train_chars), min(size, trained or size), special_tokens=(GPT2_EOT,))
    decode = byte_level_decoder_table()
    specials = {GPT2_EOT: tok.convert_tokens_to_ids(GPT2_EOT)}
    ranks = {bytes(decode[c] for c in piece): i for piece, i in tok.get_vocab().items() if piece not in specials}
    trained = len(ranks) + len(specials)
    rng = random.Random(seed)
    pool = sorted(ranks, key=ranks.get)
    next_id = max(ranks.values()) + 1
    while next_id < size:
        token = rng.choice(pool) + rng.choice(pool)
        if len(token) <= SYNTHETIC_MAX_TOKEN_BYTES and token not in ranks:
            ranks[token] = next_id
            pool.append(token)
            next_id += 1
    return Ranks("synthetic", ranks, specials, bos=GPT2_EOT, eos=GPT2_EOT, pattern=None,
                 note=f"synthetic byte-level BPE, {size:,} ids ({trained:,} trained on the shipped works, "
                      f"{size - trained:,} random merges)")


def teacher_ranks(profile: Profile, choice: str = "auto") -> Ranks:
    """The teacher vocabulary: `tekken`, `synthetic`, or `auto` (Tekken on a full run when it imports)."""
    if choice not in ("auto", "tekken", "synthetic"):
        raise ValueError(f"unknown vocabulary {choice!r}; choose auto, tekken or synthetic")
    use_tekken = choice == "tekken" or (choice == "auto" and profile is FULL and tekken_available())
    if use_tekken:
        if not tekken_available():
            raise ImportError("--vocab tekken needs the packages mistral-common and tiktoken")
        return tekken_ranks()
    return synthetic_ranks(profile.synthetic_tokens, profile.synthetic_trained, profile.synthetic_train_chars)


def bpe_merges(ranks: dict) -> list[tuple[bytes, bytes]]:
    """Merges that make a BPE encode as tiktoken does with these ranks.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank; a BPE
    joins the pair that comes first in its merge list. So every split of a token into two tokens
    is a merge, listed in the order of the joined token's rank.
    """
    merges = []
    for token in sorted(ranks, key=ranks.get):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((left, right))
    return merges


def write_bpe_tokenizer(vocab: Ranks, folder: str | Path):
    """A Hugging Face byte-level BPE tokenizer for `vocab`, saved in `folder` (and returned)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bld_scale.tokenize.token_bytes import byte_level_decoder_table

    encode = {b: ch for ch, b in byte_level_decoder_table().items()}

    def text(token: bytes) -> str:
        return "".join(encode[b] for b in token)

    pieces = {text(t): i for t, i in vocab.ranks.items()}
    clash = set(pieces) & set(vocab.specials)
    if clash:
        raise ValueError(f"special tokens {sorted(clash)} collide with byte-level pieces")
    pieces.update(vocab.specials)
    merges = [(text(a), text(b)) for a, b in bpe_merges(vocab.ranks)]
    tok = Tokenizer(models.BPE(vocab=pieces, merges=merges, fuse_unk=False))
    if vocab.pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(vocab.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in sorted(vocab.specials, key=vocab.specials.get)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=vocab.bos, eos_token=vocab.eos)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def write_student_tokenizer(profile: Profile, folder: str | Path):
    """The student's byte-level BPE, trained on the shipped works, saved in `folder`."""
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    tok = train_byte_level_bpe(training_texts(profile.student_train_chars), profile.student_tokens)
    if len(tok) != profile.student_tokens:
        raise RuntimeError(f"the student BPE reached {len(tok)} ids, not {profile.student_tokens}: "
                           "too little text for its size")
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


# ---------------------------------------------------------------------- models
def teacher_model(profile: Profile, device, dtype):
    """The randomly initialised teacher (Qwen2-1.5B shape, or tiny), frozen, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(profile.teacher_config, vocab_size=profile.teacher_rows)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.5B init on the CPU takes long
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    return model.eval()


def save_teacher_folder(profile: Profile, folder: str | Path, device, dtype) -> Path:
    """The teacher model as a Hugging Face folder (the recipe's teacher.path; its tokenizer is
    teacher.tokenizer)."""
    import gc

    import torch

    folder = Path(folder)
    model = teacher_model(profile, device, dtype)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def n_parameters(module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- environment
def versions() -> dict:
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "triton", "tokenizers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as err:  # noqa: BLE001 - a missing or broken package is a fact to record
            out[name] = None if isinstance(err, ImportError) else f"fails to import: {err}"
    import torch

    out["cuda"] = torch.version.cuda
    return out
