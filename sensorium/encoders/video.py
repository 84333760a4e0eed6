"""Video: uniform frame sampling with a small reader interface (decord by default), then the image
encoder on every sampled frame, batched.

Only the sampled frames are decoded (``VideoReader.get_batch`` on their indices) and the reader is released
right after, since decord holds memory otherwise. Clips shorter than the frame count repeat frames.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sensorium.encoders.base import Features, FrozenMixin
from sensorium.encoders.image import ImageEncoder, ImageEncoderSpec, ImagePreprocess
from sensorium.errors import MediaError


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``num_available`` frames (segment centres); repeats
    frames when the clip is shorter."""
    assert num_available > 0 and num_frames > 0, "need at least one frame to sample from and to sample"
    return [min(num_available - 1, int((i + 0.5) * num_available / num_frames)) for i in range(num_frames)]


class FrameReader(Protocol):
    """Reads ``num_frames`` uniformly sampled RGB frames ``(F, H, W, 3)`` uint8 from a file or bytes."""

    def __call__(self, source: bytes | str | Path, num_frames: int) -> np.ndarray: ...


class DecordReader:
    """Frame reader on decord: opens the clip per call (never shared across workers) and releases it."""

    def __call__(self, source: bytes | str | Path, num_frames: int) -> np.ndarray:
        import decord

        name = str(source) if isinstance(source, (str, Path)) else "<bytes>"
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise MediaError(f"{name}: zero-length video")
            handle: Any = io.BytesIO(source)
        else:
            if not Path(source).is_file():
                raise MediaError(f"{name}: no such file")
            if Path(source).stat().st_size == 0:
                raise MediaError(f"{name}: zero-length video")
            handle = str(source)
        try:
            vr = decord.VideoReader(handle, num_threads=1)
        except Exception as e:  # decord raises DECORDError / RuntimeError on undecodable input
            raise MediaError(f"{name}: not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        try:
            n = len(vr)
            if n == 0:
                raise MediaError(f"{name}: the video has no frames")
            frames = vr.get_batch(sample_indices(n, num_frames)).asnumpy()  # (F, H, W, 3)
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{name}: cannot decode frames ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        finally:
            del vr
        return frames


class VideoPreprocess:
    """Clip (path, bytes, or frames ``(F, H, W, 3)`` uint8 / ``(F, 3, H, W)`` float) → ``(F, 3, S, S)``.

    Args:
        frame: the image encoder's per-frame preprocessing.
        num_frames: frames sampled per clip.
        reader: how frames are read from files and bytes.
    """

    def __init__(self, frame: ImagePreprocess, num_frames: int, reader: FrameReader | None = None) -> None:
        self.frame, self.num_frames, self.reader = frame, num_frames, reader or DecordReader()

    def __call__(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, (bytes, bytearray, str, Path)):
            frames: Any = self.reader(raw, self.num_frames)
        elif isinstance(raw, (np.ndarray, torch.Tensor)):
            if raw.ndim != 4 or raw.shape[0] == 0:
                raise MediaError(f"a clip array must be (frames, H, W, 3) or (frames, 3, H, W), got {tuple(raw.shape)}")
            frames = raw[sample_indices(raw.shape[0], self.num_frames)]
        else:
            raise MediaError(f"cannot read a video from {type(raw).__name__}")
        return torch.stack([self.frame(f if not isinstance(f, np.ndarray) else np.ascontiguousarray(f)) for f in frames])


@dataclass
class VideoEncoderSpec:
    """A video encoder: frames sampled per clip and the image encoder applied to each.

    Args:
        image: the per-frame image encoder.
        num_frames: frames sampled uniformly per clip (up to 64 at paper scale).
    """

    image: ImageEncoderSpec = field(default_factory=ImageEncoderSpec)
    num_frames: int = 8


class VideoEncoder(FrozenMixin):
    """Runs an image encoder on every sampled frame of a batch of clips.

    ``forward(frames (I, F, 3, S, S))`` returns :class:`Features` with values ``(I, F * N, D)``: the ``N``
    tokens of each frame, frame after frame (``tokens_per_frame`` tells ``N``).

    Args:
        spec: the image encoder and the frame count.
    """

    def __init__(self, spec: VideoEncoderSpec) -> None:
        super().__init__()
        assert 1 <= spec.num_frames <= 256, f"num_frames must be in [1, 256], got {spec.num_frames}"
        self.spec = spec
        self.image = ImageEncoder(spec.image)
        self.tokens_per_frame = self.image.num_tokens()
        if spec.image.frozen:
            self.freeze()

    @property
    def out_dim(self) -> int:
        return self.image.out_dim

    @property
    def num_frames(self) -> int:
        return self.spec.num_frames

    def forward(self, frames: torch.Tensor) -> Features:
        I, F = frames.shape[:2]
        values = self.image(frames.flatten(0, 1)).values  # (I*F, N, D)
        values = values.reshape(I, F * values.shape[1], values.shape[2])  # (I, F*N, D)
        return Features(values, torch.ones(values.shape[:2], dtype=torch.bool, device=values.device))

    @property
    def transform(self) -> VideoPreprocess:
        return VideoPreprocess(self.image.transform, self.spec.num_frames)

    def preprocess(self, raw: Any) -> torch.Tensor:
        """One clip (path, bytes or frames) → ``(F, 3, S, S)``."""
        return self.transform(raw)

    def spec_dict(self) -> dict[str, Any]:
        return {**self.image.spec_dict(), "kind": "video", "num_frames": self.spec.num_frames,
                "tokens_per_frame": self.tokens_per_frame}

    def weights(self) -> dict[str, torch.Tensor]:
        """Weights in the layout ``spec.image.checkpoint`` loads (the image encoder's)."""
        return self.image.weights()


__all__ = ["DecordReader", "FrameReader", "VideoEncoder", "VideoEncoderSpec", "VideoPreprocess", "sample_indices"]
