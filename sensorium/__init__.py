"""sensorium: teach a frozen Llama-architecture language model to see, watch and listen."""

from sensorium.adapters import load_adapter, save_adapter
from sensorium.attach import AttachedModel, attach, detach
from sensorium.backbone import (
    Llama,
    LlamaConfig,
    Tokenizer,
    embedded_backbone_path,
    generate,
    load_backbone,
    load_tokenizer,
)
from sensorium.compose import ComposedModel, compose
from sensorium.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    SensoriumError,
    TokenizerError,
    UnsupportedCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "AttachedModel",
    "CheckpointError",
    "ComposedModel",
    "CheckpointNotFoundError",
    "Llama",
    "LlamaConfig",
    "SensoriumError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedCheckpointError",
    "attach",
    "compose",
    "detach",
    "embedded_backbone_path",
    "generate",
    "load_adapter",
    "load_backbone",
    "load_tokenizer",
    "save_adapter",
]
