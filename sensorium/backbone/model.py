"""Llama decoder: RMSNorm, RoPE (with Llama 3 scaling), grouped-query attention, SwiGLU, KV cache.

Module and parameter names follow the Hugging Face layout (``model.layers.0.self_attn.q_proj.weight``),
so HF checkpoints load without renaming and adapters can wrap ``model.layers[i]`` without touching keys.
The decoder layers take a :class:`DecoderContext` that carries rotary tables, the attention mask, the
cache position, the keys and values of a prefix shared by every row (optional) and an ``extras``
dictionary through which wrapping modules (adapters) receive their inputs explicitly: nothing is stored on
the model between calls except the optional KV cache.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sensorium.backbone.config import LlamaConfig, rope_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 and cast back (as Llama does)."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position tables (``cos``, ``sin``) for integer positions, half-split ("rotate_half") layout."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset(self, freq_factors: torch.Tensor | None = None) -> None:
        """Recompute the inverse frequencies, optionally divided by per-frequency ``freq_factors``.

        Args:
            freq_factors: divisors ``(head_dim // 2,)`` as stored by GGUF files (``rope_freqs.weight``).
        """
        inv = rope_inv_freq(self.config)
        if freq_factors is not None:
            assert freq_factors.shape == inv.shape, (
                f"rope frequency factors {tuple(freq_factors.shape)} do not match {tuple(inv.shape)}"
            )
            inv = inv / freq_factors.float()
        self.inv_freq = inv.to(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``positions`` ``(B, T)``: ``cos`` and ``sin`` of shape ``(B, 1, T, head_dim)``, float32."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by the position tables (computed in float32, cast back)."""
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))


class KVCache:
    """Preallocated keys and values of one attention layer: ``(B, n_kv_heads, max_len, head_dim)``."""

    def __init__(
        self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``(B, KV, T, D)`` at slots ``start:start+T``; return all slots up to there."""
        end = start + k.shape[2]
        assert end <= self.max_len, f"KV cache of length {self.max_len} cannot hold position {end}"
        assert k.shape[0] == self.k.shape[0], f"batch {k.shape[0]} does not match the cache's {self.k.shape[0]}"
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class DecoderContext:
    """What every decoder layer needs besides its hidden states.

    Attributes:
        cos: rotary table ``(B, 1, T, head_dim)``.
        sin: rotary table ``(B, 1, T, head_dim)``.
        mask: boolean attention mask ``(B, 1, T, S)`` (True = attend), or None.
        is_causal: use the causal fast path (no explicit mask).
        start: cache slot of the first query position.
        extras: inputs for modules that wrap decoder layers (adapters), keyed by their owner.
        prefix: per self-attention module (keyed by ``id``), keys and values ``(1, n_kv_heads, start,
            head_dim)`` of a prefix every row continues (see :meth:`Llama.prefix_kv`), or None.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    start: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if self.cache is not None:
            k, v = self.cache.update(ctx.start, k, v)  # (B, KV, S, D)
        elif ctx.prefix is not None:  # the shared prefix, broadcast over the rows
            pk, pv = ctx.prefix[id(self)]
            k, v = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2), torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config.dim, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of HF checkpoints)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Llama(nn.Module):
    """A Llama-architecture causal language model.

    Args:
        config: its shape.

    ``model(tokens)`` returns logits ``(B, T, vocab)``. ``layers`` is the ``nn.ModuleList`` of decoder
    layers and ``embed_tokens`` the token embedding, so adapters can wrap layers and splice embeddings.

    ``activation_checkpointing = True`` recomputes each decoder layer (with the adapter blocks in front of
    it) in the backward instead of keeping its activations: less memory for about one more forward of
    compute. It applies when gradients are being recorded and no KV cache is set up (training).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output head with the token embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    # ----------------------------------------------------------------------------------------- cache
    def setup_caches(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache of ``max_len`` slots per layer; forward then reads and writes it."""
        p = self.model.embed_tokens.weight
        for layer in self.model.layers:
            attn = _self_attention(layer)
            attn.cache = KVCache(
                batch_size, max_len, attn.n_kv_heads, attn.head_dim, dtype=dtype or p.dtype, device=p.device
            )

    def clear_caches(self) -> None:
        """Drop the KV caches (forward attends within its input only)."""
        for layer in self.model.layers:
            _self_attention(layer).cache = None

    @property
    def caches_enabled(self) -> bool:
        return _self_attention(self.model.layers[0]).cache is not None

    @torch.no_grad()
    def prefix_kv(self, embeds: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every layer for the prefix ``embeds`` ``(1, P, dim)``, computed without
        adapter inputs or gradients: ``forward(embeds=rest, prefix=...)`` then continues each row of
        ``rest`` after it, as if the prefix stood in front of every row."""
        assert embeds.shape[0] == 1, "a shared prefix is one row"
        assert not self.caches_enabled, "prefix_kv needs the KV caches cleared"
        self.setup_caches(1, embeds.shape[1], dtype=embeds.dtype)
        try:
            self(embeds=embeds, last_only=True)
            attns = [_self_attention(layer) for layer in self.model.layers]
            return {id(a): (a.cache.k, a.cache.v) for a in attns}
        finally:
            self.clear_caches()

    # --------------------------------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T, dim)``; ids outside the vocabulary are an error."""
        vocab = self.config.vocab_size
        if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            bad = tokens[(tokens >= vocab) | (tokens < 0)][0].item()
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab}); media placeholders must be "
                "replaced before the backbone sees them"
            )
        return self.model.embed_tokens(tokens)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        start: int = 0,
        extras: dict[str, Any] | None = None,
        prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` (or final hidden states ``(B, T, dim)`` with ``return_hidden``).

        Args:
            tokens: token ids ``(B, T)``; give either these or ``embeds``.
            embeds: input embeddings ``(B, T, dim)``.
            pad_mask: ``(B, start + T)`` True where a slot holds a real token (left padding for batched
                generation); positions then count real tokens only.
            start: cache slot of the first input position (non-zero only with a KV cache).
            extras: inputs for wrapping modules (see :class:`DecoderContext`).
            prefix: what :meth:`prefix_kv` gave for a prefix of P positions: the input continues every row
                after it (positions from P; no KV cache).
            last_only: compute logits for the last position only.
            return_hidden: return the final normed hidden states instead of logits.
        """
        assert (tokens is None) != (embeds is None), "give exactly one of tokens and embeds"
        x = self.embed(tokens) if embeds is None else embeds  # (B, T, dim)
        B, T, _ = x.shape
        if prefix is not None:
            assert not self.caches_enabled and pad_mask is None and start == 0, "a prefix goes without a KV cache"
            start = next(iter(prefix.values()))[0].shape[2]
        else:
            assert start == 0 or self.caches_enabled, "start > 0 needs a KV cache (setup_caches)"
        ctx = self._context(B, T, start, pad_mask, x.device, extras)
        ctx.prefix = prefix
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not self.caches_enabled
        for layer in self.model.layers:
            if recompute:
                if hasattr(layer, "prepare"):  # adapter blocks' media K/V: computed once, outside the recomputation
                    layer.prepare(ctx)
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def _context(
        self, B: int, T: int, start: int, pad_mask: torch.Tensor | None, device: torch.device, extras: dict | None
    ) -> DecoderContext:
        S = start + T
        q_slots = torch.arange(start, S, device=device)
        if pad_mask is None:
            positions = q_slots[None].expand(B, T)  # (B, T)
            mask, is_causal = None, (T > 1 and start == 0)
            if T > 1 and start > 0:
                mask = (torch.arange(S, device=device)[None, :] <= q_slots[:, None])[None, None]  # (1, 1, T, S)
        else:
            assert pad_mask.shape == (B, S), f"pad_mask {tuple(pad_mask.shape)} must be (batch, start + T) = {(B, S)}"
            pad_mask = pad_mask.to(device=device, dtype=torch.bool)
            positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:S]  # (B, T)
            k_slots = torch.arange(S, device=device)
            causal = k_slots[None, :] <= q_slots[:, None]  # (T, S)
            # A query always sees itself, so a padding row is never fully masked (which would give NaN).
            mask = (causal[None] & pad_mask[:, None, :]) | (k_slots[None, :] == q_slots[:, None])[None]  # (B, T, S)
            mask, is_causal = mask[:, None], False  # (B, 1, T, S)
        cos, sin = self.model.rotary_emb(positions)
        return DecoderContext(cos=cos, sin=sin, mask=mask, is_causal=is_causal, start=start, extras=extras or {})


def _self_attention(layer: nn.Module) -> Attention:
    """The self-attention of a decoder layer, looking through wrappers that expose ``.layer``."""
    while not hasattr(layer, "self_attn"):
        assert hasattr(layer, "layer"), f"{type(layer).__name__} is neither a decoder layer nor wraps one"
        layer = layer.layer
    return layer.self_attn
