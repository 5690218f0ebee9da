"""The paper's Long Range Arena model, built on skyformer_ext.nn.SkyformerAttention.

2 pre-norm transformer layers, embedding 64, feed-forward hidden 128, 2 heads of dim 32, learned position
embeddings, mean pooling over the valid (non-pad) tokens, and an MLP classifier. ``attention`` picks the
kernel (softmax = PyTorch SDPA, kernelized, or skyformer with ``num_landmarks`` landmarks); the parameters
are the same for all three.
"""

from __future__ import annotations

import torch
from torch import nn

from skyformer_ext.nn import SkyformerAttention


class EncoderLayer(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, num_heads: int, dropout: float, **attention_kwargs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.attention = SkyformerAttention(embed_dim, num_heads, **attention_kwargs)
        self.feed_forward_norm = nn.LayerNorm(embed_dim)
        self.feed_forward = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(hidden_dim, embed_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), key_padding_mask=padding))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class ListOpsClassifier(nn.Module):
    """Token ids (batch, seq) with ``pad_id`` padding -> logits (batch, num_classes)."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, *, pad_id: int = 0,
                 attention: str = "skyformer", num_landmarks: int = 128, embed_dim: int = 64,
                 hidden_dim: int = 128, num_layers: int = 2, num_heads: int = 2, dropout: float = 0.1,
                 landmark_refine: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.position_embedding = nn.Embedding(max_length, embed_dim)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim, hidden_dim, num_heads, dropout, attention=attention,
                         num_landmarks=num_landmarks, landmark_refine=landmark_refine) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(),
                                        nn.Linear(hidden_dim, num_classes))

    def set_attention(self, attention: str) -> None:
        for layer in self.layers:
            layer.attention.attention = attention

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == self.pad_id
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x, padding)
        x = self.final_norm(x)
        valid = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = (x * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        return self.classifier(pooled)
