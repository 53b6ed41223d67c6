"""Synthetic teacher log-probabilities for conversion tests on real vocabularies."""
import torch


def window_logprobs(windows, vocab_size: int, peaked: bool, seed: int = 0) -> torch.Tensor:
    """[B, L_max + 1, V] float32 log-probabilities on the CPU for token windows `windows`;
    peaked: each window's next token gets a large logit, as a trained teacher's would."""
    g = torch.Generator().manual_seed(seed)
    rows = max(len(w) for w in windows) + 1
    logits = torch.randn(len(windows), rows, vocab_size, generator=g) * 2.0
    if peaked:
        for b, ids in enumerate(windows):
            boost = torch.randn(len(ids), generator=g) * 2.5 + 6.0
            logits[b, torch.arange(len(ids)), torch.tensor(ids)] += boost
    return torch.log_softmax(logits, dim=-1)
