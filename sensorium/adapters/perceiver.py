"""Perceiver resampler: the temporal aggregator of video adapters.

Every ``group`` consecutive frames (32 at paper scale) are merged into one set of ``num_latents`` latent
tokens: learned latents cross-attend to the frame tokens of their group (plus themselves), with a learned
embedding per frame position added to the tokens, so the latents know which frame saw what — which is
what direction of motion needs. With ``tokens_per_frame``, a learned embedding per token position within a
frame is added too: features of a convolutional encoder say what is in a cell but not where the cell is,
and motion is a change of cell. With ``positions_in_keys_only`` these embeddings steer the attention (they
are added to the keys) but are kept out of the values, as in DETR: what the latents read is content alone.
With ``motion_summary`` each group's output also carries one token of the net change of the pooled
features from the group's first frame to its last: the motion over the group, readable by the blocks
without the latents having to learn to compare frames first.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerceiverConfig:
    """Shape of a perceiver resampler.

    Args:
        media_dim: width of the frame tokens.
        dim: width of the latents (and of the output).
        num_latents: latents per group of frames.
        num_frames: frames per clip.
        group: consecutive frames merged into one latent set (clipped to ``num_frames``).
        depth: cross-attention + MLP layers.
        n_heads: attention heads.
        tokens_per_frame: encoder tokens per frame, each given a learned position embedding (0: none, for
            encoders whose tokens carry their position already).
        motion_tokens: add one motion token per frame (normalised change of the frame's mean-pooled
            features since the previous frame) to the tokens the latents read.
        positions_in_keys_only: add the frame, token-position and motion-type embeddings to the attention
            keys only, not to the values.
        position_value_heads: with ``positions_in_keys_only``, the last this-many heads take the embeddings
            into their values too: they read where and when, the other heads content alone.
        motion_summary: append to each group's latents one token made from the normalised change of the
            mean-pooled features from the group's first frame to its last (needs ``motion_tokens``, whose
            normalisation it shares).
    """

    media_dim: int
    dim: int
    num_latents: int = 16
    num_frames: int = 8
    group: int = 32
    depth: int = 2
    n_heads: int = 8
    tokens_per_frame: int = 0
    motion_tokens: bool = False
    positions_in_keys_only: bool = False
    position_value_heads: int = 0
    motion_summary: bool = False

    def __post_init__(self) -> None:
        self.group = min(self.group, self.num_frames)
        if self.num_frames % self.group:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of group {self.group}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if not 0 <= self.position_value_heads <= self.n_heads:
            raise ValueError(f"position_value_heads must be in 0..{self.n_heads}, got {self.position_value_heads}")
        if self.position_value_heads and not self.positions_in_keys_only:
            raise ValueError("position_value_heads needs positions_in_keys_only")
        if self.motion_summary and not self.motion_tokens:
            raise ValueError("motion_summary needs motion_tokens")

    @property
    def groups(self) -> int:
        return self.num_frames // self.group


class PerceiverLayer(nn.Module):
    """Latents attend to ``[frame tokens; latents]``, then a GELU MLP; both residual.

    Args:
        dim: width.
        n_heads: attention heads.
        position_value_heads: when the layer is given key positions, the last this-many heads take them into
            their values too.
    """

    def __init__(self, dim: int, n_heads: int, position_value_heads: int = 0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.position_value_heads = position_value_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, key_position: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, T, D) tokens, ``latents`` (B, L, D); ``key_position`` (T, D) or (B, T, D), when given, is
        added to the normalised tokens for the keys (and the values of the last ``position_value_heads``)."""
        B, L, D = latents.shape
        H = self.n_heads
        lat = self.norm_latents(latents)
        context = torch.cat([self.norm_media(x), lat], dim=1)  # (B, T + L, D)
        q = self.q(lat).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        if key_position is None:
            k, v = self.kv(context).view(B, context.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T+L, D/H)
        else:
            w_k, w_v = self.kv.weight.chunk(2)
            keyed = torch.cat([context[:, : x.shape[1]] + key_position, lat], dim=1)
            k = F.linear(keyed, w_k).view(B, -1, H, D // H).transpose(1, 2)
            v = F.linear(context, w_v)
            if self.position_value_heads:
                first = (H - self.position_value_heads) * (D // H)  # where those heads' value columns start
                v = torch.cat([v[..., :first], F.linear(keyed, w_v[first:])], dim=-1)
            v = v.view(B, -1, H, D // H).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D/H)
        latents = latents + self.out(attn.transpose(1, 2).reshape(B, L, D))
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """Frame tokens ``(I, F, N, media_dim)`` → latents ``(I, F // group, num_latents, dim)``.

    Args:
        config: its shape.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        # Tokens are normalised first, so per-frame embeddings of unit scale mark time as strongly as content.
        self.input_norm = nn.LayerNorm(config.media_dim)
        self.frame_embedding = nn.Parameter(torch.randn(config.group, config.media_dim))
        self.token_embedding = (nn.Parameter(torch.randn(config.tokens_per_frame, config.media_dim))
                                if config.tokens_per_frame else None)
        if config.motion_tokens:
            self.motion_norm = nn.LayerNorm(config.media_dim)
            self.motion_embedding = nn.Parameter(torch.randn(config.media_dim))  # marks a token as motion
        self.in_proj = nn.Linear(config.media_dim, config.dim)
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(config.dim, config.n_heads, config.position_value_heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.group_embedding = nn.Parameter(torch.randn(config.groups, config.dim))  # order of the groups (unit scale, like the normalised latents)

    @property
    def tokens_out(self) -> int:
        """Output tokens per clip."""
        return self.config.groups * (self.config.num_latents + self.config.motion_summary)

    def scale_position_embeddings_(self, factor: float) -> "PerceiverResampler":
        """Multiply the frame, token-position and motion-type embeddings (drawn at unit scale) by ``factor``:
        started small, they leave the content of the tokens in front early in training."""
        with torch.no_grad():
            for p in (self.frame_embedding, self.token_embedding, getattr(self, "motion_embedding", None)):
                if p is not None:
                    p.mul_(factor)
        return self

    def motion(self, frames: torch.Tensor) -> torch.Tensor:
        """``(I, F, N, D)`` frame tokens → ``(I, F, D)``: the normalised change of each frame's mean-pooled
        features since the previous frame (the first frame's change is zero)."""
        pooled = frames.mean(2)
        change = torch.cat([torch.zeros_like(pooled[:, :1]), pooled[:, 1:] - pooled[:, :-1]], dim=1)
        return self.motion_norm(change)

    def motion_over_groups(self, frames: torch.Tensor) -> torch.Tensor:
        """``(I, F, N, D)`` frame tokens → ``(I, F // group, D)``: the normalised change of the mean-pooled
        features from each group's first frame to its last."""
        I, Fr, _, D = frames.shape
        pooled = frames.mean(2).view(I, Fr // self.config.group, self.config.group, D)
        return self.motion_norm(pooled[:, :, -1] - pooled[:, :, 0])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(I, F, N, media_dim)`` → ``(I, F // group, num_latents (+ 1 with motion_summary), dim)``."""
        I, Fr, N, D = frames.shape
        G = self.config.group
        assert Fr == self.config.num_frames, f"expected {self.config.num_frames} frames per clip, got {Fr}"
        x = self.input_norm(frames).reshape(I * (Fr // G), G * N, D)  # content, (I*F/G, G*N, D)
        position = self.frame_embedding[:, None, :].expand(G, N, D)  # (G, N, D)
        if self.token_embedding is not None:
            assert N == self.config.tokens_per_frame, f"expected {self.config.tokens_per_frame} tokens per frame, got {N}"
            position = position + self.token_embedding
        position = position.reshape(G * N, D)
        if self.config.motion_tokens:
            x = torch.cat([x, self.motion(frames).reshape(I * (Fr // G), G, D)], dim=1)  # (I*F/G, G*N + G, D)
            position = torch.cat([position, self.frame_embedding + self.motion_embedding])
        if self.config.positions_in_keys_only:
            key_position = F.linear(position, self.in_proj.weight)  # in the latents' width, like the tokens
            x = self.in_proj(x)
        else:
            key_position, x = None, self.in_proj(x + position)  # (I*F/G, tokens, dim)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (I*F/G, L, dim)
        for layer in self.layers:
            latents = layer(x, latents, key_position)
        out = self.norm(latents).view(I, Fr // G, self.config.num_latents, -1)  # (I, F/G, L, dim)
        if self.config.motion_summary:
            summary = self.norm(self.in_proj(self.motion_over_groups(frames)))  # (I, F/G, dim)
            out = torch.cat([out, summary[:, :, None]], dim=2)  # (I, F/G, L + 1, dim)
        return out + self.group_embedding[None, :, None, :]
