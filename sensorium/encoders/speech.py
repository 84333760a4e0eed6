"""Speech encoder: 16 kHz mono waveform → 80-dim log-mel (10 ms hop) → 4 frames stacked + linear (40 ms)
→ Conformer (``torchaudio.models.Conformer``).

Audio files are read with soundfile; stereo is averaged to mono and other rates are resampled with
torchaudio. Log-mels are computed per utterance and the Conformer's depthwise convolutions see zeros
beyond each utterance's end, so an utterance gives the same features alone and padded inside a batch.
The number of output frames is exact: ``output_length(num_samples)``.
"""

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensorium.encoders.base import Features, FrozenMixin
from sensorium.errors import MediaError

SAMPLE_RATE = 16000
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms


@dataclass
class SpeechEncoderSpec:
    """What builds a speech encoder and its preprocessing.

    Args:
        dim: Conformer width.
        num_layers: Conformer layers.
        num_heads: attention heads.
        ffn_dim: feed-forward width.
        kernel_size: depthwise convolution kernel (odd).
        dropout: dropout inside the Conformer (off when frozen).
        n_mels: log-mel channels.
        stack: consecutive 10 ms frames stacked into one (4: 40 ms frames).
        min_seconds: shorter audio is rejected.
        max_seconds: longer audio is truncated to this length with a warning (or rejected, see ``truncate``).
        truncate: truncate over-long audio (else reject it).
        silence_peak: audio whose peak amplitude is below this is rejected as silent.
        checkpoint: local weights (safetensors or a ``weights_only`` torch file); None: random init.
        frozen: no gradients, eval mode kept (the default); False trains it with the adapter.
    """

    dim: int = 144
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 576
    kernel_size: int = 15
    dropout: float = 0.0
    n_mels: int = 80
    stack: int = 4
    min_seconds: float = 0.1
    max_seconds: float = 20.0
    truncate: bool = True
    silence_peak: float = 1e-3
    checkpoint: str | None = None
    frozen: bool = True


def read_audio(source: bytes | str | Path, *, name: str | None = None) -> tuple[np.ndarray, int]:
    """Samples ``(n, channels)`` float32 and the sample rate of an audio file (wav, flac, ogg...) or its bytes."""
    import soundfile as sf

    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes) and not source:
        raise MediaError(f"{name}: zero bytes")
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                             always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise MediaError(f"{name}: not readable audio ({e})") from e
    except OSError as e:
        raise MediaError(f"{name}: cannot read ({e.strerror or e})") from e
    return data, int(rate)


class AudioPreprocess:
    """Raw audio (file path, bytes, ``(samples, rate)`` or a 16 kHz array/tensor) → mono 16 kHz float32 ``(n,)``.

    Rejects (``MediaError``) unreadable, empty, too short, silent or non-finite audio; truncates (with a
    warning) or rejects audio longer than the spec's maximum. Picklable, for DataLoader workers.
    """

    def __init__(self, spec: SpeechEncoderSpec) -> None:
        self.min_seconds, self.max_seconds = spec.min_seconds, spec.max_seconds
        self.truncate, self.silence_peak = spec.truncate, spec.silence_peak

    def __call__(self, raw: Any) -> torch.Tensor:
        name = str(raw) if isinstance(raw, (str, Path)) else "audio"
        if isinstance(raw, (bytes, str, Path)):
            data, rate = read_audio(raw)
        elif isinstance(raw, tuple) and len(raw) == 2:
            data, rate = np.asarray(raw[0], dtype=np.float32), int(raw[1])
        else:
            data, rate = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=np.float32), SAMPLE_RATE
        if data.ndim == 2:
            data = data.mean(axis=1 if data.shape[1] <= data.shape[0] else 0)  # channels → mono
        if data.ndim != 1 or data.size == 0:
            raise MediaError(f"{name}: no audio samples")
        if not np.isfinite(data).all():
            raise MediaError(f"{name}: NaN or infinite samples")
        wave = torch.from_numpy(np.ascontiguousarray(data))
        if rate != SAMPLE_RATE:
            import torchaudio.functional as AF

            wave = AF.resample(wave, rate, SAMPLE_RATE)
        seconds = wave.numel() / SAMPLE_RATE
        if seconds < self.min_seconds:
            raise MediaError(f"{name}: too short ({seconds:.3f} s < {self.min_seconds} s)")
        if float(wave.abs().max()) < self.silence_peak:
            raise MediaError(f"{name}: silent (peak below {self.silence_peak})")
        if seconds > self.max_seconds:
            if not self.truncate:
                raise MediaError(f"{name}: too long ({seconds:.1f} s > {self.max_seconds} s)")
            warnings.warn(f"{name}: {seconds:.1f} s of audio truncated to {self.max_seconds} s", stacklevel=2)
            wave = wave[: int(self.max_seconds * SAMPLE_RATE)]
        return wave


def speech_frames(num_samples: int, stack: int) -> int:
    """Encoder frames for ``num_samples`` samples: ``num_samples // 160 + 1`` log-mel frames, ``stack`` per frame."""
    return (num_samples // HOP + 1) // stack


class LogMel(nn.Module):
    """Waveform ``(n,)`` → log-mel ``(n // 160 + 1, n_mels)``: log10 power, 8 decades of range, scaled to ~[-1, 1]."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=n_mels)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.mel(wave.float()).clamp(min=1e-10).log10()  # (n_mels, T)
        spec = torch.maximum(spec, spec.max() - 8.0)
        return ((spec + 4.0) / 4.0).T  # (T, n_mels)


class SpeechEncoder(FrozenMixin):
    """Log-mel + frame stacking + Conformer.

    ``forward(waves)`` takes a list of 1-D waveforms (or a padded ``(B, n)`` tensor with ``lengths``) and
    returns :class:`Features` ``(B, T, dim)`` with the mask of real frames.

    Args:
        spec: its shape, preprocessing limits and weights.
    """

    def __init__(self, spec: SpeechEncoderSpec) -> None:
        super().__init__()
        from torchaudio.models import Conformer

        self.spec = spec
        self.logmel = LogMel(spec.n_mels)
        self.stack_proj = nn.Linear(spec.n_mels * spec.stack, spec.dim)
        self.conformer = Conformer(input_dim=spec.dim, num_heads=spec.num_heads, ffn_dim=spec.ffn_dim,
                                   num_layers=spec.num_layers, depthwise_conv_kernel_size=spec.kernel_size,
                                   dropout=spec.dropout)
        if spec.checkpoint:
            self.load_weights(spec.checkpoint)
        if spec.frozen:
            self.freeze()

    @property
    def out_dim(self) -> int:
        return self.spec.dim

    def output_length(self, num_samples: int) -> int:
        """Encoder frames for ``num_samples`` samples at 16 kHz."""
        return speech_frames(num_samples, self.spec.stack)

    def load_weights(self, path: str | Path) -> None:
        from sensorium.encoders.image import read_weights

        state = read_weights(Path(path))
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("logmel.")]
        if missing or unexpected:
            raise MediaError(f"{path}: not weights of this speech encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def weights(self) -> dict[str, torch.Tensor]:
        """Learned weights (the log-mel filterbank is rebuilt from the spec)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("logmel.")}

    def spec_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder and its preprocessing (for adapter manifests)."""
        return {**asdict(self.spec), "kind": "speech", "sample_rate": SAMPLE_RATE, "out_dim": self.out_dim}

    @property
    def transform(self) -> AudioPreprocess:
        return AudioPreprocess(self.spec)

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Raw audio → 16 kHz mono waveform ``(n,)``."""
        return self.transform(raw)

    def stacked_frames(self, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-utterance log-mels stacked by ``stack``, padded: ``(B, T, n_mels * stack)`` and lengths ``(B,)``."""
        S = self.spec.stack
        rows = []
        for w in waves:
            mel = self.logmel(w)  # (T_mel, n_mels)
            T = mel.shape[0] // S
            rows.append(mel[: T * S].reshape(T, S * mel.shape[1]))
        lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths

    def forward(self, waves: list[torch.Tensor] | torch.Tensor, lengths: torch.Tensor | None = None) -> Features:
        if isinstance(waves, torch.Tensor):
            waves = list(waves) if lengths is None else [w[: int(n)] for w, n in zip(waves, lengths, strict=True)]
        frames, n = self.stacked_frames(waves)
        if int(n.min()) < 1:
            raise MediaError(f"audio of {min(w.numel() for w in waves)} samples gives no encoder frame")
        valid = torch.arange(frames.shape[1], device=frames.device)[None] < n[:, None]  # (B, T)
        x = self.stack_proj(frames)
        return Features(conformer_forward(self.conformer, x, valid), valid)


def conformer_forward(conformer: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``torchaudio.models.Conformer`` on ``(B, T, D)`` with padded frames kept out of every layer's result.

    Attention already ignores padded keys; the depthwise convolutions would see padded frames, so their
    input is zeroed there — exactly what an unpadded utterance sees past its end.
    """
    keep = valid[..., None].to(x.dtype)  # (B, T, 1)
    pad = ~valid
    for layer in conformer.conformer_layers:
        x = x + 0.5 * layer.ffn1(x)
        if layer.convolution_first:
            x = x + _conv_module(layer.conv_module, x, keep)
        h = layer.self_attn_layer_norm(x).transpose(0, 1)  # (T, B, D)
        h, _ = layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + layer.self_attn_dropout(h.transpose(0, 1))
        if not layer.convolution_first:
            x = x + _conv_module(layer.conv_module, x, keep)
        x = layer.final_layer_norm(x + 0.5 * layer.ffn2(x))
    return x * keep


def _conv_module(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    seq = module.sequential  # pointwise conv, GLU, depthwise conv, norm, SiLU, pointwise conv, dropout
    h = seq[1](seq[0](module.layer_norm(x).transpose(1, 2)))  # (B, C, T)
    h = h * keep.transpose(1, 2)
    for m in list(seq)[2:]:
        h = m(h)
    return h.transpose(1, 2)


def save_speech_encoder(encoder: SpeechEncoder, path: str | Path) -> Path:
    """Write the encoder's learned weights as safetensors (atomically)."""
    from sensorium.adapters.artifact import atomic_save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.contiguous() for k, v in encoder.weights().items()}, path)
    return path


__all__ = ["AudioPreprocess", "LogMel", "SpeechEncoder", "SpeechEncoderSpec", "conformer_forward", "read_audio",
           "save_speech_encoder", "speech_frames"]
