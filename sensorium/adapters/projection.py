"""Projection adapter (LLaVA style): a two-layer MLP maps encoder tokens to LM embeddings, which replace
the placeholder positions of the embedding sequence (one position per media token)."""

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sensorium.backbone.config import LlamaConfig


@dataclass
class ProjectionConfig:
    """Shape of a projection adapter.

    Args:
        dim: language-model width.
        media_dim: encoder feature width.
        hidden: MLP hidden width.
        tokens_per_item: media tokens per item (placeholder positions each item occupies).
        media_norm: LayerNorm on encoder features first.
    """

    dim: int
    media_dim: int
    hidden: int
    tokens_per_item: int
    media_norm: bool = True

    @classmethod
    def for_backbone(cls, config: LlamaConfig, media_dim: int, *, tokens_per_item: int, hidden: int | None = None,
                     **overrides: Any) -> "ProjectionConfig":
        """A projector into the backbone's width (hidden width = the LM width unless given)."""
        return cls(dim=config.dim, media_dim=media_dim, hidden=hidden or config.dim, tokens_per_item=tokens_per_item,
                   **overrides)


class ProjectionAdapter(nn.Module):
    """``Linear → GELU → Linear`` from encoder tokens to embeddings spliced at placeholder positions.

    Args:
        config: its shape.
        modality: ``"image"``, ``"video"`` or ``"speech"``.
    """

    kind = "projection"
    layers: list[int] = []
    blocks: list[nn.Module] = []

    def __init__(self, config: ProjectionConfig, *, modality: str = "image") -> None:
        super().__init__()
        self.config, self.modality = config, modality
        self.media_norm = nn.LayerNorm(config.media_dim) if config.media_norm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(config.media_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.dim)
        )

    @property
    def tokens_per_item(self) -> int:
        return self.config.tokens_per_item

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(..., N, dim)`` for encoder tokens ``(..., N, media_dim)``."""
        return self.mlp(self.media_norm(features))

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "modality": self.modality, "config": asdict(self.config),
                "placement": {"splice": True, "tokens_per_item": self.tokens_per_item}}
