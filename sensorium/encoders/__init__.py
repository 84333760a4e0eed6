"""Frozen pretrained encoders: each returns :class:`Features` for a batch of media."""

import dataclasses
from typing import Any

from torch import nn

from sensorium.encoders.base import Features, FrozenMixin
from sensorium.encoders.image import ImageEncoder, ImageEncoderSpec, load_image, save_encoder
from sensorium.encoders.video import VideoEncoder, VideoEncoderSpec


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    """An encoder from a manifest's encoder spec (``kind`` selects the class; unknown keys are ignored)."""
    kind = spec.get("kind", "image")
    if kind == "speech":
        from sensorium.encoders.speech import SpeechEncoder, SpeechEncoderSpec

        names = {f.name for f in dataclasses.fields(SpeechEncoderSpec)}
        # inference: frozen, and over-long audio is truncated with a warning (training rejects it instead)
        fixed = {"frozen": True, "truncate": True}
        return SpeechEncoder(SpeechEncoderSpec(**{k: v for k, v in spec.items() if k in names} | fixed))
    fields = {f.name for f in dataclasses.fields(ImageEncoderSpec)}
    image = ImageEncoderSpec(**{k: v for k, v in spec.items() if k in fields})
    if kind == "image":
        return ImageEncoder(image)
    if kind == "video":
        return VideoEncoder(VideoEncoderSpec(image=image, num_frames=int(spec["num_frames"])))
    raise ValueError(f"unknown encoder kind {kind!r}")


__all__ = [
    "Features",
    "FrozenMixin",
    "ImageEncoder",
    "ImageEncoderSpec",
    "VideoEncoder",
    "VideoEncoderSpec",
    "build_encoder",
    "load_image",
    "save_encoder",
]
