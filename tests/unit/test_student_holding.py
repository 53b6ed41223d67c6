"""model.export.student_holding: the student final/ is written from holds the gathered tensors
themselves (no second copy of the model) and saves exactly as the student they came from."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bld_scale.demo import STUDENT_TOKENIZER_DIR
from bld_scale.model.export import save_hf_folder, student_holding
from bld_scale.model.student import build_student, load_student

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)


def _student(tokenizer, tied: bool):
    torch.manual_seed(0)
    return build_student({**CONFIG, "vocab_size": len(tokenizer), "tie_word_embeddings": tied}, head_kind="causal",
                         K=4, attn_implementation="sdpa", head_size={"width": 32, "layers": 1}).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_it_holds_the_state_tensors_and_saves_as_the_original(tmp_path, tokenizer, tied):
    original = _student(tokenizer, tied)
    state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    if tied:
        state["lm.lm_head.weight"] = state["lm.model.embed_tokens.weight"]  # one tensor, as gathered
    held = student_holding(original, state)
    for name, tensor in held.state_dict().items():
        assert tensor.data_ptr() == state[name].data_ptr(), name  # the same memory: nothing copied
    assert (held.lm.lm_head.weight is held.lm.model.embed_tokens.weight) == tied
    save_hf_folder(original, tokenizer, tmp_path / "original")
    save_hf_folder(held, tokenizer, tmp_path / "held")
    for f in ("model.safetensors", "byte_head.safetensors"):
        a, b = load_file(tmp_path / "held" / f), load_file(tmp_path / "original" / f)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
    assert ("lm_head.weight" in load_file(tmp_path / "held" / "model.safetensors")) == (not tied)
    for f in ("config.json", "generation_config.json", "byte_head.json"):
        assert (tmp_path / "held" / f).read_text() == (tmp_path / "original" / f).read_text(), f
    reloaded = load_student(tmp_path / "held", attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 5, 9, 14]])
    prev = torch.zeros(1, 4, 4, dtype=torch.long)
    with torch.no_grad():
        want, got = original(ids, prev_bytes=prev), reloaded(ids, prev_bytes=prev)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_it_refuses_a_state_that_does_not_fit(tokenizer):
    original = _student(tokenizer, tied=False)
    state = {k: v.detach().clone() for k, v in original.state_dict().items() if "byte_head" not in k}
    with pytest.raises(RuntimeError, match="missing .*byte_head"):
        student_holding(original, state)


def test_a_student_trained_with_flash_attention_is_held_without_it(tokenizer):
    """A GPU run's config may name FlashAttention-2, which refuses fp32 weights (and is not
    installed here): the holding student, which never runs, does not ask for it."""
    original = _student(tokenizer, tied=False)
    original.lm.config._attn_implementation = "flash_attention_2"
    held = student_holding(original, {k: v.detach().clone() for k, v in original.state_dict().items()})
    assert held.lm.config._attn_implementation == "eager"
    assert original.lm.config._attn_implementation == "flash_attention_2"  # the run's own is untouched
