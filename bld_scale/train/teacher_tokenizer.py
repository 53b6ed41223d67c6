"""Is the teacher's tokenizer the teacher model's own? Cheap checks, refused as TokenizerError.

A tokenizer of another model gives the teacher ids it was never trained on: every number the run
reports, and every target it distils, is then noise, with no error anywhere. Four checks:

(a) sizes (`rows_problem`, before the model loads): more ids than embedding rows is refused; fewer
    is normal only as padding of the embedding (Qwen2: 151,646 ids, 151,936 rows), so at most
    `max(128, rows / 16)` rows may be left without a token.
(b) special tokens (`special_token_problems`, before the model loads): the tokenizer's BOS and EOS
    ids must be among the model's `bos_token_id` / `eos_token_id` (config.json, text config, and
    generation_config.json; an id or a list) wherever both sides set one.
(c) a separate teacher.tokenizer folder while teacher.path holds tokenizer files too
    (`vocabulary_problem`): both must map at least 99% of their common range of token strings
    to the same ids (room for reserved tokens that a fine-tune renamed).
(d) behaviour (`check_beats_uniform`, after the teacher's held-out evaluation): a model reading
    its own ids predicts far better than a uniform guess over its rows, which costs
    n_tokens * log2(rows) / n_bytes bits per byte on the same text; a token-level BPB above that
    means the ids are not the model's (or the model is untrained).
The demo teacher passes all four (its token-level BPB is about 2.5 against a bound of about 4.1).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MIN_SHARED = 0.99  # (c): share of the smaller vocabulary that must map to the same ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


class TokenizerError(ValueError):
    """Tokenizers the run must refuse (not the model's, or unusable as the recipe says); the
    message names the recipe key and the fix. `launch/distill.py` prints it as one line, exit 2."""


def tokenizer_source(teacher) -> str:
    """Where the teacher's tokenizer comes from, as the recipe key that names it."""
    if teacher.tokenizer:
        return f"teacher.tokenizer={teacher.tokenizer}"
    return f"the tokenizer files in teacher.path={teacher.path}"


def unused_rows_allowed(rows: int) -> int:
    return max(128, rows // 16)


def rows_problem(n_ids: int, rows: int, source: str) -> str | None:
    """(a): the tokenizer must fill the embedding, up to padding rows; more ids than rows is refused
    at once (TokenizerError)."""
    if n_ids > rows:
        raise TokenizerError(f"teacher tokenizer ({source}) has {n_ids} ids but the teacher model embeds only "
                             f"{rows}: wrong tokenizer for this model (teacher.tokenizer)")
    if rows - n_ids > unused_rows_allowed(rows):
        return (f"it has {n_ids} ids for the model's {rows} embedding rows, leaving {rows - n_ids} rows unread "
                f"(padding explains at most {unused_rows_allowed(rows)})")
    return None


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if v is not None}
    return {int(value)}


def model_special_ids(config, model_path: str | None) -> dict[str, set[int]]:
    """The model's BOS / EOS ids: config (top level and text config) and generation_config.json."""
    sources = [config]
    if hasattr(config, "get_text_config"):
        sources.append(config.get_text_config())
    found = {"bos": set(), "eos": set()}
    for source in sources:
        for kind in found:
            found[kind] |= _ids(getattr(source, f"{kind}_token_id", None))
    generation = Path(model_path) / "generation_config.json" if model_path else None
    if generation is not None and generation.is_file():
        try:
            values = json.loads(generation.read_text())
        except ValueError:
            values = {}
        for kind in found:
            found[kind] |= _ids(values.get(f"{kind}_token_id"))
    return found


def special_token_problems(tok, model_ids: dict[str, set[int]]) -> list[str]:
    """(b): the tokenizer's BOS / EOS ids that the model's config does not know."""
    problems = []
    for kind in ("bos", "eos"):
        token_id = getattr(tok, f"{kind}_token_id", None)
        if token_id is not None and model_ids[kind] and int(token_id) not in model_ids[kind]:
            expected = " or ".join(str(i) for i in sorted(model_ids[kind]))
            problems.append(f"its {kind.upper()} token {getattr(tok, f'{kind}_token', None)!r} is id {token_id}, "
                            f"the model's {kind}_token_id is {expected}")
    return problems


def has_tokenizer_files(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def vocabulary_problem(tok, folder_tok) -> str | None:
    """(c): None when both map (almost) every token of the smaller vocabulary to the same id."""
    a, b = tok.get_vocab(), folder_tok.get_vocab()
    shared = sum(1 for token, i in a.items() if b.get(token) == i)
    smaller = min(len(a), len(b))
    if smaller and shared >= MIN_SHARED * smaller:
        return None
    return (f"only {shared} of its {len(a)} tokens have the same id in the model folder's tokenizer "
            f"({len(b)} tokens)")


def check_teacher_tokenizer(teacher, tok, rows: int, config=None, log=print) -> None:
    """(a), (b) and (c) for the recipe's `teacher` section and its loaded tokenizer `tok`."""
    source = tokenizer_source(teacher)
    problems = [p for p in [rows_problem(len(tok), rows, source)] if p]
    if config is not None:
        problems += special_token_problems(tok, model_special_ids(config, teacher.path))
    separate = teacher.tokenizer and Path(teacher.tokenizer).resolve() != Path(teacher.path).resolve()
    if separate and has_tokenizer_files(teacher.path):
        from transformers import AutoTokenizer

        try:
            folder_tok = AutoTokenizer.from_pretrained(teacher.path)
        except Exception as err:  # noqa: BLE001 - an unreadable copy only skips this check
            log(f"note: could not load the tokenizer in teacher.path={teacher.path} to compare it with "
                f"teacher.tokenizer ({type(err).__name__}: {err}); check skipped")
        else:
            problem = vocabulary_problem(tok, folder_tok)
            if problem:
                problems.append(problem)
    if problems:
        stale = all("_token_id is" in p for p in problems)  # only the config disagrees
        raise TokenizerError(
            f"teacher tokenizer ({source}) is not the teacher model's (teacher.path={teacher.path}): "
            + "; ".join(problems) + ". Set teacher.tokenizer to the model's own tokenizer (null: the one in "
            "teacher.path)" + ("; if this tokenizer is right and the model's config.json is stale, correct "
                               "its bos_token_id / eos_token_id" if stale else ""))


def uniform_bpb(n_tokens: float, n_bytes: float, rows: int) -> float:
    """Bits per byte of a uniform guess over `rows` ids for each of `n_tokens` tokens."""
    return n_tokens * math.log2(rows) / n_bytes


def eval_token_counts(windows, teacher_vocab) -> list[float]:
    """[teacher tokens, text bytes] of `windows`, as the held-out evaluation counts them."""
    n_tokens = sum(len(teacher_vocab.encode(w)[0]) for w in windows)
    return [float(n_tokens), float(sum(len(w.encode("utf-8")) for w in windows))]


def check_beats_uniform(token_bpb: float, n_tokens: float, n_bytes: float, rows: int, teacher) -> None:
    """(d): refuse a teacher whose held-out token-level BPB is worse than a uniform guess."""
    if n_bytes <= 0 or n_tokens <= 0:
        return
    bound = uniform_bpb(n_tokens, n_bytes, rows)
    if token_bpb > bound:
        raise TokenizerError(
            f"the teacher's token-level BPB on the held-out text is {token_bpb:.4f}, worse than a uniform guess "
            f"over its {rows} ids ({int(n_tokens)} tokens x log2({rows}) / {int(n_bytes)} bytes = {bound:.4f}): "
            f"the ids it reads are not the ones it was trained on. The tokenizer ({tokenizer_source(teacher)}) "
            f"does not belong to the model in teacher.path={teacher.path} (or that model is untrained); use "
            "the model's own tokenizer")
