"""Cross-tokenizer baselines for `distill.method`, one module per method, each its paper's loss.

- `edit_distance`: byte-string Levenshtein distances, vectorised (Myers/Hyyrö bit-parallel), and
  the nearest-token vocabulary map MinED uses (cached per tokenizer pair).
- `mined`: MinED (Wan et al. 2024, "Knowledge Fusion of Large Language Models", FuseLLM).
- `dskd`: DSKD with cross-model attention (Zhang et al. 2024, "Dual-Space Knowledge Distillation
  for Large Language Models").
- `alm`: ALM (Minixhofer et al. 2025, "Cross-Tokenizer Distillation via Approximate Likelihood
  Matching").

They sit beside `train.losses` and `train.step` in the layers (tensor functions and alignment;
no DeepSpeed). Padded batches only: a packed batch is refused by `train.step`.
"""
