"""The frozen Llama-architecture language model: config, decoder, checkpoints, tokenizer, decoding."""

from sensorium.backbone.checkpoint import embedded_backbone_path, load_backbone
from sensorium.backbone.config import PRESETS, LlamaConfig, RopeScaling
from sensorium.backbone.generate import TextStreamer, generate, sample_next
from sensorium.backbone.model import DecoderContext, KVCache, Llama
from sensorium.backbone.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "DecoderContext",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "TextStreamer",
    "Tokenizer",
    "embedded_backbone_path",
    "generate",
    "load_backbone",
    "load_tokenizer",
    "sample_next",
]
