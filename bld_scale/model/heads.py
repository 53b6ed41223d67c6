"""Byte decoder heads: the student's next-token hidden state -> distributions over its next bytes.

Byte-Level Distillation (BLD; Singh et al. 2026, "Cross-Tokenizer LLM Distillation through a
Byte-Level Interface") attaches a small byte decoder to the student. The hidden state ``h`` that
predicts the student's next token ``u`` also predicts the first ``K`` bytes of ``u``; slot ``i``
targets byte ``i`` of ``u``. Output alphabet: 256 bytes + column 256 = EOT (``BYTE_VOCAB = 257``).

Two heads share one interface, ``head(hidden [B,J,d], prev_bytes [B,J,K] long) -> [B,J,K,257]``:

- ``linear`` (the paper's): K parallel linear maps ``d -> 257`` of ``h``. It cannot see the earlier
  bytes of the token although the teacher target of slot i is conditioned on them; it ignores
  ``prev_bytes``.
- ``causal`` (ours): a small causal transformer over ``[proj(h), emb(x[a]), .., emb(x[a+K-2])]``,
  teacher-forced with the true bytes, so slot i sees bytes 0..i-1 of its token and can represent
  the conditional target exactly.

``prev_bytes[..., i]`` is the true byte at slot i (-100 where the slot is masked); slot i's input
uses bytes 0..i-1, so the last column is never read. Heads are saved beside a Hugging Face model
folder as ``byte_head.safetensors`` + ``byte_head.json`` (kind, hidden size, K, sizes).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

BYTE_VOCAB = 257  # 256 byte values + EOT
EOT = 256
HEAD_WEIGHTS_FILE = "byte_head.safetensors"
HEAD_CONFIG_FILE = "byte_head.json"


class ByteHead(nn.Module):
    """Common base: remembers what is needed to rebuild the head from ``byte_head.json``."""

    kind: str = ""

    def __init__(self, hidden_size: int, K: int):
        super().__init__()
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        self.hidden_size = int(hidden_size)
        self.K = int(K)

    def size_config(self) -> dict:
        """Keyword arguments (beyond hidden_size, K) that rebuild this head."""
        return {}

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} != head's {self.hidden_size}")


class LinearByteHead(ByteHead):
    """K parallel ``d -> 257`` maps of the same hidden state (the BLD paper's head).

    Stored as one ``d -> K*257`` linear layer: the same maps, one matmul.
    """

    kind = "linear"

    def __init__(self, hidden_size: int, K: int = 10, bias: bool = True):
        super().__init__(hidden_size, K)
        self.bias = bool(bias)
        self.proj = nn.Linear(self.hidden_size, self.K * BYTE_VOCAB, bias=self.bias)

    def size_config(self) -> dict:
        return {"bias": self.bias}

    def forward(self, hidden: torch.Tensor, prev_bytes: torch.Tensor | None = None) -> torch.Tensor:
        self._check_hidden(hidden)
        # prev_bytes is accepted for a common interface and ignored: this head sees only h.
        logits = self.proj(hidden.to(self.proj.weight.dtype))
        return logits.unflatten(-1, (self.K, BYTE_VOCAB))


class _CausalBlock(nn.Module):
    """Pre-norm transformer block with causal SDPA attention over the K slots."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, K, w]
        n, k, w = x.shape
        q, kk, v = self.qkv(self.norm_attn(x)).view(n, k, 3, self.heads, w // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + F.dropout(self.attn_out(attn.transpose(1, 2).reshape(n, k, w)), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm_mlp(x)), self.dropout, self.training)


class CausalByteHead(ByteHead):
    """Small causal transformer over ``[proj(h), emb(byte_0), .., emb(byte_{K-2})]``.

    Position i of the sequence outputs slot i's logits; causal attention lets it see ``h`` and the
    true bytes 0..i-1 of the token (teacher forcing), never byte i or later.
    """

    kind = "causal"
    PAD_INDEX = BYTE_VOCAB  # embedding row for masked (-100) bytes; rows 0..255 bytes, 256 EOT

    def __init__(self, hidden_size: int, K: int = 10, width: int = 128, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__(hidden_size, K)
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.width, self.layers, self.heads = int(width), int(layers), int(heads)
        self.mlp_ratio, self.dropout = int(mlp_ratio), float(dropout)
        self.in_proj = nn.Linear(self.hidden_size, self.width)
        self.byte_embedding = nn.Embedding(BYTE_VOCAB + 1, self.width)
        self.position_embedding = nn.Parameter(torch.randn(self.K, self.width) * 0.02)
        self.blocks = nn.ModuleList(
            _CausalBlock(self.width, self.heads, self.mlp_ratio, self.dropout) for _ in range(self.layers)
        )
        self.norm_out = nn.LayerNorm(self.width)
        self.out = nn.Linear(self.width, BYTE_VOCAB)

    def size_config(self) -> dict:
        return {"width": self.width, "layers": self.layers, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout}

    def forward(self, hidden: torch.Tensor, prev_bytes: torch.Tensor) -> torch.Tensor:
        self._check_hidden(hidden)
        if prev_bytes is None:
            raise ValueError("the causal byte head needs prev_bytes (the true bytes, -100 masked)")
        lead = hidden.shape[:-1]
        if prev_bytes.shape != (*lead, self.K):
            raise ValueError(f"prev_bytes shape {tuple(prev_bytes.shape)} != {(*lead, self.K)}")
        dtype = self.in_proj.weight.dtype
        first = self.in_proj(hidden.to(dtype)).unsqueeze(-2)  # [..., 1, w]
        # Slot i reads bytes 0..i-1, so the last true byte is never an input.
        inputs = prev_bytes[..., : self.K - 1].long()
        inputs = torch.where(inputs < 0, torch.full_like(inputs, self.PAD_INDEX), inputs)
        seq = torch.cat([first, self.byte_embedding(inputs).to(dtype)], dim=-2)
        seq = (seq + self.position_embedding.to(dtype)).reshape(-1, self.K, self.width)
        for block in self.blocks:
            seq = block(seq)
        return self.out(self.norm_out(seq)).reshape(*lead, self.K, BYTE_VOCAB)


HEAD_KINDS: dict[str, type[ByteHead]] = {"linear": LinearByteHead, "causal": CausalByteHead}


def build_byte_head(kind: str, hidden_size: int, K: int = 10, **size) -> ByteHead:
    """Build a fresh byte head. ``size``: per-kind options (causal: width, layers, heads, ...)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown byte head kind {kind!r}; choose from {sorted(HEAD_KINDS)}")
    return HEAD_KINDS[kind](hidden_size, K, **size)


def save_byte_head(head: ByteHead, folder: str | os.PathLike) -> None:
    """Write ``byte_head.safetensors`` + ``byte_head.json`` into ``folder`` (created if needed)."""
    os.makedirs(folder, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in head.state_dict().items()}
    save_file(state, os.path.join(folder, HEAD_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"kind": head.kind, "hidden_size": head.hidden_size, "K": head.K, "size": head.size_config()}
    with open(os.path.join(folder, HEAD_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def load_byte_head(folder: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> ByteHead:
    """Rebuild a head saved by ``save_byte_head``; weights keep their saved dtype unless ``dtype``."""
    with open(os.path.join(folder, HEAD_CONFIG_FILE)) as f:
        config = json.load(f)
    head = build_byte_head(config["kind"], config["hidden_size"], config["K"], **config.get("size", {}))
    state = load_file(os.path.join(folder, HEAD_WEIGHTS_FILE), device=str(device))
    head.to(device=device, dtype=next(iter(state.values())).dtype)
    head.load_state_dict(state, strict=True)
    return head.to(dtype=dtype) if dtype is not None else head
