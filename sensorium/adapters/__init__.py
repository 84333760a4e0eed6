"""Trainable adapters that connect frozen encoders to the frozen backbone, and their files."""

from sensorium.adapters.artifact import (
    AdapterError,
    AdapterHashWarning,
    AdapterMismatchError,
    load_adapter,
    load_encoder,
    read_manifest,
    save_adapter,
)
from sensorium.adapters.cross_attention import CrossAttentionAdapter, CrossAttentionConfig, placement
from sensorium.adapters.fusion import FusedLayer, fuse, unfuse
from sensorium.adapters.projection import ProjectionAdapter, ProjectionConfig

__all__ = [
    "AdapterError",
    "AdapterHashWarning",
    "AdapterMismatchError",
    "CrossAttentionAdapter",
    "CrossAttentionConfig",
    "FusedLayer",
    "ProjectionAdapter",
    "ProjectionConfig",
    "fuse",
    "load_adapter",
    "load_encoder",
    "placement",
    "read_manifest",
    "save_adapter",
    "unfuse",
]
