"""Gated cross-attention adapter: media tokens reach the frozen decoder through blocks in front of its layers.

Each block (Llama 3 / Mllama style) is ``x + tanh(g_attn) * xattn(norm(x), media)`` followed by
``h + tanh(g_mlp) * mlp(norm(h))``, with grouped-query attention, RMSNorm on queries and keys, no
positional encoding on media, and both gates initialised to 0 so an untrained adapter leaves the
backbone's output unchanged. Text positions that see no media get exactly zero from a block.

Media visibility follows the Flamingo rule: a text position attends to the media whose placeholder
stands at or before it (``attend="previous"``: all of them; ``attend="last"``: the latest one). A composed
model can also end an item's visibility at a later slot (``token_end``, see :mod:`sensorium.compose`).
"""

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sensorium.backbone.config import LlamaConfig
from sensorium.backbone.model import MLP, DecoderContext, RMSNorm

if TYPE_CHECKING:
    from sensorium.adapters.perceiver import PerceiverConfig


@dataclass
class CrossAttentionConfig:
    """Shape and placement of a cross-attention adapter.

    Args:
        dim: language-model width.
        media_dim: encoder feature width.
        n_heads: query heads.
        n_kv_heads: key/value heads over media (grouped-query attention).
        head_dim: per-head width.
        mlp_hidden: SwiGLU hidden width of each block.
        layers: decoder layer indices that get a block in front of them.
        norm_eps: RMSNorm epsilon.
        media_norm: LayerNorm on encoder features before the shared media projection.
        attend: ``"previous"`` (all media placed before a position) or ``"last"`` (only the latest).
    """

    dim: int
    media_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    layers: list[int] = field(default_factory=list)
    norm_eps: float = 1e-5
    media_norm: bool = True
    attend: str = "previous"

    @classmethod
    def for_backbone(cls, config: LlamaConfig, media_dim: int, *, every: int = 4, offset: int = 0,
                     **overrides: Any) -> "CrossAttentionConfig":
        """Blocks shaped like the backbone's layers (heads, widths), in front of every ``every``-th layer."""
        base = dict(dim=config.dim, media_dim=media_dim, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                    head_dim=config.head_dim, mlp_hidden=config.intermediate_size,
                    layers=placement(config.n_layers, every, offset=offset), norm_eps=config.norm_eps)
        return cls(**(base | overrides))

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.attend not in ("previous", "last"):
            raise ValueError(f"attend must be 'previous' or 'last', got {self.attend!r}")


def placement(n_layers: int, every: int, *, offset: int = 0) -> list[int]:
    """Indices of every ``every``-th decoder layer starting at ``offset`` (paper: every 4th)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return list(range(offset, n_layers, every))


class MediaInputs:
    """Projected media of one modality for a batch, and where each item's placeholder stands.

    Args:
        values: ``(B, L, dim)`` media tokens, ``L = items * tokens_per_item``.
        token_valid: ``(B, L)`` True for tokens of real items.
        token_slot: ``(B, L)`` sequence slot of the placeholder of each token's item.
        attend: visibility rule (see module docstring).
        token_end: ``(B, L)`` first slot that no longer sees each token's item; None: seen to the end.
    """

    def __init__(self, values: torch.Tensor, token_valid: torch.Tensor, token_slot: torch.Tensor, attend: str,
                 token_end: torch.Tensor | None = None) -> None:
        self.values, self.token_valid, self.token_slot, self.attend = values, token_valid, token_slot, attend
        self.token_end = token_end
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per block: media K/V, computed once
        self._masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def mask(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask ``(B, 1, T, L)`` (no row empty) and ``(B, T, 1)`` rows-that-see-media, for slots ``start..start+T``."""
        key = (start, T)
        if key not in self._masks:
            q = torch.arange(start, start + T, device=self.values.device)  # (T,)
            visible = (self.token_slot[:, None, :] <= q[None, :, None]) & self.token_valid[:, None, :]  # (B, T, L)
            if self.token_end is not None:
                visible = visible & (q[None, :, None] < self.token_end[:, None, :])
            if self.attend == "last":
                latest = torch.where(visible, self.token_slot[:, None, :], -1).amax(-1, keepdim=True)  # (B, T, 1)
                visible = visible & (self.token_slot[:, None, :] == latest)
            has = visible.any(-1, keepdim=True)  # (B, T, 1)
            # Rows without media attend everywhere (their output is zeroed), so SDPA never sees an empty row.
            self._masks[key] = ((visible | ~has)[:, None], has)
        return self._masks[key]


class CrossAttention(nn.Module):
    """Grouped-query attention from text positions to media tokens, with RMSNorm on queries and keys."""

    def __init__(self, c: CrossAttentionConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.q_norm = RMSNorm(c.head_dim, eps=c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, eps=c.norm_eps)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, KV, L, D)`` of projected media ``(B, L, dim)``."""
        B, L, _ = media.shape
        k = self.k_proj(media).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, D)
        v = self.v_proj(media).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, D)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2))  # (B, H, T, D)
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """One gated cross-attention block placed in front of a decoder layer (parameter names as Mllama's)."""

    def __init__(self, c: CrossAttentionConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, eps=c.norm_eps)
        self.cross_attn = CrossAttention(c)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.mlp_hidden)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def media_kv(self, media: MediaInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's keys and values of the media, computed on first use and kept in ``media``."""
        key = id(self)
        if key not in media.kv:
            media.kv[key] = self.cross_attn.media_kv(media.values)
        return media.kv[key]

    def forward(self, x: torch.Tensor, media: MediaInputs, ctx: DecoderContext) -> torch.Tensor:
        T = x.shape[1]
        mask, has = media.mask(ctx.start, T)
        k, v = self.media_kv(media)
        has = has.to(x.dtype)
        h = x + self.cross_attn_attn_gate.tanh().to(x.dtype) * has * self.cross_attn(self.input_layernorm(x), k, v, mask)
        return h + self.cross_attn_mlp_gate.tanh().to(x.dtype) * has * self.mlp(self.post_attention_layernorm(h))


class CrossAttentionAdapter(nn.Module):
    """Media projection, a learned placeholder embedding and gated blocks for the configured layers.

    Args:
        config: shape and placement.
        modality: ``"image"`` or ``"video"``.
    """

    kind = "cross_attention"

    def __init__(self, config: CrossAttentionConfig, *, modality: str = "image") -> None:
        super().__init__()
        self.config, self.modality = config, modality
        self.media_norm = nn.LayerNorm(config.media_dim) if config.media_norm else nn.Identity()
        self.media_proj = nn.Linear(config.media_dim, config.dim)
        self.placeholder_embedding = nn.Parameter(torch.zeros(config.dim))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(config) for _ in config.layers)

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    tokens_per_item = 1  # the placeholder stays one position; media arrive through cross-attention

    def prepare(self, features: torch.Tensor, item_valid: torch.Tensor, item_slot: torch.Tensor) -> MediaInputs:
        """Project per-item features ``(B, M, N, media_dim)`` for the blocks.

        Args:
            features: encoder tokens per item.
            item_valid: ``(B, M)`` True for real items.
            item_slot: ``(B, M)`` sequence slot of each item's placeholder.
        """
        B, M, N, _ = features.shape
        values = self.media_proj(self.media_norm(features)).reshape(B, M * N, -1)  # (B, M*N, dim)
        token_valid = item_valid[:, :, None].expand(B, M, N).reshape(B, M * N)  # (B, M*N)
        token_slot = item_slot[:, :, None].expand(B, M, N).reshape(B, M * N)  # (B, M*N)
        return MediaInputs(values, token_valid, token_slot, self.config.attend)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "modality": self.modality, "config": asdict(self.config),
                "placement": {"layers": self.layers}}


class VideoCrossAttentionAdapter(CrossAttentionAdapter):
    """Cross-attention adapter for video: a perceiver resampler merges frames before the blocks see them.

    Args:
        config: the blocks (``media_dim`` must equal the perceiver's ``dim``).
        perceiver: the temporal aggregator over encoder frame tokens.
        modality: ``"video"``.
    """

    kind = "video_cross_attention"

    def __init__(self, config: CrossAttentionConfig, perceiver: "PerceiverConfig", *, modality: str = "video") -> None:
        from sensorium.adapters.perceiver import PerceiverResampler

        assert config.media_dim == perceiver.dim, f"blocks read width {config.media_dim}, the perceiver gives {perceiver.dim}"
        super().__init__(config, modality=modality)
        self.perceiver_config = perceiver
        self.perceiver = PerceiverResampler(perceiver)

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder tokens ``(I, F * N, D)`` → latents ``(I, perceiver.tokens_out, dim)``."""
        I, FN, D = features.shape
        Fr = self.perceiver_config.num_frames
        assert FN % Fr == 0, f"{FN} tokens per clip do not split into {Fr} frames"
        out = self.perceiver(features.view(I, Fr, FN // Fr, D))  # (I, F/G, L, dim)
        return out.flatten(1, 2)  # (I, F/G*L, dim)

    def init_from(self, image_adapter: CrossAttentionAdapter) -> None:
        """Copy the blocks (by decoder layer) of a trained image adapter; the perceiver stays fresh."""
        by_layer = dict(zip(image_adapter.layers, image_adapter.blocks, strict=True))
        missing = [i for i in self.layers if i not in by_layer]
        if missing:
            raise ValueError(f"the image adapter has no block at layer(s) {missing} to initialise from")
        for layer, block in zip(self.layers, self.blocks, strict=True):
            block.load_state_dict(by_layer[layer].state_dict())

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "modality": self.modality,
                "config": {"cross_attention": asdict(self.config), "perceiver": asdict(self.perceiver_config)},
                "placement": {"layers": self.layers}}
