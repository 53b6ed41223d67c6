"""Tiny randomly initialised causal LMs for unit tests (built from a config: nothing to download)."""
import torch


def tiny_llama(vocab_size: int, seed: int = 0, *, layers: int = 1, init: float = 0.2):
    """A one-layer Llama of width 32 in eval mode; `init` widens the weights so outputs are peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()
