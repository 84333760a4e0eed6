"""Speech adapter: encoder frames → LM embeddings spliced into the token-embedding sequence.

A convolution (kernel 3, stride 2: 40 ms → 80 ms frames), one rotary pre-norm transformer layer and a
linear map to the LM width. Each utterance fills its ``<|speech|>`` placeholder span, whose length is
computed exactly from the audio length (``output_length``); padding in a batch never changes an
utterance's embeddings (padded frames are zeroed before the convolution and masked in attention).
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sensorium.backbone.config import LlamaConfig
from sensorium.backbone.model import MLP, RMSNorm, apply_rotary


@dataclass
class SpeechAdapterConfig:
    """Shape of a speech adapter.

    Args:
        media_dim: encoder frame width.
        dim: language-model width.
        hidden: width of the convolution and the transformer layer.
        n_heads: attention heads of the transformer layer.
        mlp_hidden: SwiGLU hidden width.
        stride: convolution stride (2: 80 ms output frames from 40 ms encoder frames).
        rope_theta: rotary base.
    """

    media_dim: int
    dim: int
    hidden: int = 512
    n_heads: int = 8
    mlp_hidden: int = 1024
    stride: int = 2
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        assert self.hidden % self.n_heads == 0, f"hidden {self.hidden} is not divisible by n_heads {self.n_heads}"
        assert (self.hidden // self.n_heads) % 2 == 0, "rotary heads need an even head width"

    @classmethod
    def for_backbone(cls, config: LlamaConfig, media_dim: int, **overrides: Any) -> "SpeechAdapterConfig":
        """An adapter into the backbone's width (hidden width = min(LM width, 512) unless given)."""
        hidden = overrides.pop("hidden", min(config.dim, 512))
        return cls(media_dim=media_dim, dim=config.dim, hidden=hidden, mlp_hidden=overrides.pop("mlp_hidden", 2 * hidden),
                   **overrides)


class RotaryLayer(nn.Module):
    """Pre-norm self-attention with rotary positions and a SwiGLU MLP; padded keys masked."""

    def __init__(self, c: SpeechAdapterConfig) -> None:
        super().__init__()
        self.n_heads = c.n_heads
        self.attn_norm = RMSNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden, bias=False)
        self.o = nn.Linear(c.hidden, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden)
        self.mlp = MLP(c.hidden, c.mlp_hidden)
        hd = c.hidden // c.n_heads
        self.register_buffer("inv_freq", 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        freqs = torch.arange(T, device=x.device).float()[:, None] * self.inv_freq.to(x.device)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # keys: real frames only
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.mlp_norm(x))


def conv_length(frames: int, stride: int) -> int:
    """Output length of the adapter's convolution (kernel 3, padding 1) over ``frames`` frames."""
    return (frames + 2 - 3) // stride + 1


class SpeechAdapter(nn.Module):
    """Conv (k3, s2) → rotary transformer layer → linear: encoder frames ``(I, N, media_dim)`` with their
    mask → embeddings ``(I, N', dim)`` and mask ``(I, N')``.

    Args:
        config: its shape.
        modality: ``"speech"``.
    """

    kind = "speech"
    layers: list[int] = []
    blocks: list[nn.Module] = []
    variable_length = True  # positions per item depend on the item (``output_length``)

    def __init__(self, config: SpeechAdapterConfig, *, modality: str = "speech") -> None:
        super().__init__()
        self.config, self.modality = config, modality
        self.conv = nn.Conv1d(config.media_dim, config.hidden, kernel_size=3, stride=config.stride, padding=1)
        self.layer = RotaryLayer(config)
        self.norm = RMSNorm(config.hidden)
        self.out = nn.Linear(config.hidden, config.dim)

    def output_length(self, frames: int) -> int:
        """Embeddings for ``frames`` encoder frames (the convolution's output length)."""
        return conv_length(frames, self.config.stride)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        I, N, _ = features.shape
        if mask is None:
            mask = torch.ones(I, N, dtype=torch.bool, device=features.device)
        x = features * mask[..., None].to(features.dtype)  # what an unpadded item sees past its end: zeros
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (I, N', hidden)
        lengths = torch.tensor([self.output_length(int(n)) for n in mask.sum(-1)], device=features.device)
        valid = torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]  # (I, N')
        x = self.out(self.norm(self.layer(x, valid)))
        return x * valid[..., None].to(x.dtype), valid

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "modality": self.modality, "config": asdict(self.config),
                "placement": {"splice": True, "tokens_per_item": "variable"}}


__all__ = ["RotaryLayer", "SpeechAdapter", "SpeechAdapterConfig", "conv_length"]
