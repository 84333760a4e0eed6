"""Shape of a Llama-architecture decoder, with named presets.

The presets follow the published configurations of the models they name; ``tiny`` is a small random
shape for tests and examples.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sensorium.errors import UnsupportedCheckpointError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (long wavelengths divided by ``factor``, smooth in between).

    Args:
        factor: divisor applied to the frequencies whose wavelength exceeds the low-frequency bound.
        low_freq_factor: ``original_max_position_embeddings / low_freq_factor`` is the low-frequency wavelength bound.
        high_freq_factor: ``original_max_position_embeddings / high_freq_factor`` is the high-frequency bound.
        original_max_position_embeddings: context length the model was pretrained with.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder.

    Args:
        vocab_size: rows of the token embedding.
        dim: model width (``hidden_size``).
        n_layers: number of decoder layers.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention when fewer than ``n_heads``).
        intermediate_size: SwiGLU hidden width.
        head_dim: per-head width; ``dim // n_heads`` when None.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: Llama 3 frequency scaling, or None for plain RoPE.
        max_seq_len: longest sequence the model is meant for (sizes the KV cache by default).
        tie_word_embeddings: output head shares the token embedding's weight.
        bos_token_id: beginning-of-sequence id, when the checkpoint names one.
        eos_token_ids: ids that end generation.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, (
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
        )
        if self.head_dim is None:
            assert self.dim % self.n_heads == 0, f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})"
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        assert self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE"

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset, optionally with some fields replaced.

        Args:
            name: one of :data:`PRESETS`.
            **overrides: fields to replace.
        """
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Build from a transformers ``LlamaConfig`` dictionary (a ``config.json``).

        Raises:
            UnsupportedCheckpointError: the config is not a Llama decoder or uses an unknown rope type.
        """
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise UnsupportedCheckpointError(f"{source}: model_type {model_type!r} is not 'llama'")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise UnsupportedCheckpointError(f"{source}: {key}=true is not supported")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        n_heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            intermediate_size=int(hf["intermediate_size"]),
            head_dim=hf.get("head_dim"),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_from_hf(hf.get("rope_scaling") or hf.get("rope_parameters"), source),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent transformers ``config.json`` dictionary."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return out

    def num_params(self) -> int:
        """Parameter count (tied heads counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head


def _rope_scaling_from_hf(rs: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedCheckpointError(
            f"{source}: rope type {kind!r} is not supported (supported: 'default', 'llama3')"
        )
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``(head_dim // 2,)`` in float32, with Llama 3 scaling when configured."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(between, smoothed, scaled)


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=160,
        rope_theta=10000.0, max_seq_len=512, tie_word_embeddings=True,
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
        rope_theta=100000.0, max_seq_len=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_seq_len=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=131072,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
        rope_theta=10000.0, max_seq_len=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
}
