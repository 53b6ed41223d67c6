"""Byte heads: shapes, what each slot may see, save/load."""
import json

import pytest
import torch

from bld_scale.model.heads import (
    BYTE_VOCAB, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, CausalByteHead, LinearByteHead, build_byte_head,
    load_byte_head, save_byte_head,
)

HIDDEN, K = 24, 5
SMALL_CAUSAL = {"width": 32, "layers": 2, "heads": 4}


def _inputs(seed=0, batch=2, positions=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, positions, HIDDEN, generator=g)
    prev_bytes = torch.randint(0, 256, (batch, positions, K), generator=g)
    return hidden, prev_bytes


def _head(kind):
    torch.manual_seed(0)
    return build_byte_head(kind, HIDDEN, K, **(SMALL_CAUSAL if kind == "causal" else {})).eval()


@pytest.mark.parametrize("kind", ["linear", "causal"])
def test_shapes_and_gradient_to_hidden(kind):
    head = _head(kind)
    hidden, prev_bytes = _inputs()
    hidden.requires_grad_()
    logits = head(hidden, prev_bytes)
    assert logits.shape == (2, 3, K, BYTE_VOCAB) == (2, 3, K, 257)
    logits[..., 0, :].sum().backward()
    assert torch.count_nonzero(hidden.grad) > 0


def test_build_defaults_and_errors():
    assert isinstance(build_byte_head("linear", HIDDEN), LinearByteHead)
    head = build_byte_head("causal", HIDDEN)
    assert isinstance(head, CausalByteHead) and head.K == 10 and head.width == 128 and head.layers == 2
    with pytest.raises(ValueError):
        build_byte_head("lstm", HIDDEN)
    with pytest.raises(ValueError):
        build_byte_head("causal", HIDDEN, K, width=30, heads=4)
    with pytest.raises(ValueError):
        _head("causal")(*_inputs()[:1], None)
    with pytest.raises(ValueError):
        _head("linear")(torch.randn(1, 2, HIDDEN + 1))


def test_linear_head_is_k_parallel_maps_and_ignores_prev_bytes():
    head = _head("linear")
    hidden, prev_bytes = _inputs()
    logits = head(hidden, prev_bytes)
    assert torch.equal(logits, head(hidden, torch.randint(0, 256, prev_bytes.shape)))
    assert torch.equal(logits, head(hidden, None))
    weight = head.proj.weight.view(K, BYTE_VOCAB, HIDDEN)
    bias = head.proj.bias.view(K, BYTE_VOCAB)
    for i in range(K):
        torch.testing.assert_close(logits[..., i, :], hidden @ weight[i].T + bias[i])


def test_causal_head_slot_sees_only_earlier_bytes():
    head = _head("causal")
    hidden, prev_bytes = _inputs()
    base = head(hidden, prev_bytes)
    for changed in range(K):
        other = prev_bytes.clone()
        other[..., changed] = (other[..., changed] + 1 + torch.arange(other[..., changed].numel()).view(2, 3)) % 256
        out = head(hidden, other)
        # Slots 0..changed do not read byte `changed`; every later slot does.
        torch.testing.assert_close(out[..., : changed + 1, :], base[..., : changed + 1, :], rtol=0, atol=1e-6)
        if changed < K - 1:
            assert (out[..., changed + 1:, :] - base[..., changed + 1:, :]).abs().amax() > 1e-4
    # The hidden state feeds every slot.
    moved = head(hidden + 0.5, prev_bytes)
    assert ((moved - base).abs().amax(dim=-1) > 1e-4).all()


def test_causal_head_masked_bytes_use_pad_embedding():
    head = _head("causal")
    hidden, prev_bytes = _inputs()
    masked = prev_bytes.clone()
    masked[0, 1, 2:] = -100  # token of 2 bytes: slots 2.. masked
    out = head(hidden, masked)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1, :3], head(hidden, prev_bytes)[0, 1, :3], rtol=0, atol=1e-6)
    as_pad = prev_bytes.clone()
    as_pad[0, 1, 2:] = CausalByteHead.PAD_INDEX
    torch.testing.assert_close(out, head(hidden, as_pad), rtol=0, atol=0)


def test_head_runs_bf16_hidden_in_float32_head():
    head = _head("causal")
    hidden, prev_bytes = _inputs()
    out = head(hidden.bfloat16(), prev_bytes)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "causal"])
def test_save_load_round_trip(kind, tmp_path):
    head = _head(kind)
    hidden, prev_bytes = _inputs()
    save_byte_head(head, tmp_path)
    assert (tmp_path / HEAD_WEIGHTS_FILE).exists()
    config = json.loads((tmp_path / HEAD_CONFIG_FILE).read_text())
    assert config["kind"] == kind and config["K"] == K and config["hidden_size"] == HIDDEN
    loaded = load_byte_head(tmp_path).eval()
    assert type(loaded) is type(head) and loaded.size_config() == head.size_config()
    assert torch.equal(loaded(hidden, prev_bytes), head(hidden, prev_bytes))
    assert all(p.dtype == torch.bfloat16 for p in load_byte_head(tmp_path, dtype=torch.bfloat16).parameters())
