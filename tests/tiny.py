"""Tiny backbone, encoder and adapters shared by the tests (the ``parts`` fixture lives in conftest)."""

import torch

from sensorium.adapters import (
    CrossAttentionAdapter,
    CrossAttentionConfig,
    ProjectionAdapter,
    ProjectionConfig,
)
from sensorium.backbone import Llama, LlamaConfig
from sensorium.compose import ComposedModel
from sensorium.encoders import ImageEncoder, ImageEncoderSpec


def tiny_backbone(seed: int = 0, *, std: float = 0.2) -> Llama:
    """A frozen random ``tiny`` Llama whose weights are drawn with ``std`` (large enough to give varied tokens)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.requires_grad_(False)


def tiny_encoder() -> ImageEncoder:
    torch.manual_seed(1)
    return ImageEncoder(ImageEncoderSpec(name="resnet10t", image_size=32))


def randomise(module: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """Give every parameter (gates included) non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if p.numel() == 1 else 0.0))
    return module


def make_parts():
    bb, enc = tiny_backbone(), tiny_encoder()
    xattn = CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, enc.out_dim, every=2))
    proj = ProjectionAdapter(ProjectionConfig.for_backbone(bb.config, enc.out_dim, tokens_per_item=enc.num_tokens()))
    return bb, enc, xattn, proj


def compose_tiny(bb, enc, adapter) -> ComposedModel:
    return ComposedModel(bb, [adapter], encoders={"image": enc})
