"""sensorium: teach a frozen Llama-architecture language model to see, watch and listen."""

from sensorium.backbone import (
    Llama,
    LlamaConfig,
    Tokenizer,
    embedded_backbone_path,
    generate,
    load_backbone,
    load_tokenizer,
)
from sensorium.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    SensoriumError,
    TokenizerError,
    UnsupportedCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "Llama",
    "LlamaConfig",
    "SensoriumError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedCheckpointError",
    "embedded_backbone_path",
    "generate",
    "load_backbone",
    "load_tokenizer",
]
