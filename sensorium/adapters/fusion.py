"""Placing adapter blocks in front of decoder layers without renaming the backbone's weights.

:class:`FusedLayer` wraps one decoder layer. Its state dict hides the wrapper (``model.layers.3.*`` keys
stay exactly as they were) and the adapter blocks it runs are *not* registered in it: they belong to
their adapter, so the backbone's parameters and keys are those of the bare backbone. Blocks read their
inputs from ``DecoderContext.extras[modality]`` and are skipped when that modality is absent.
"""

from typing import Any

import torch
from torch import nn

from sensorium.backbone.model import DecoderContext


class FusedLayer(nn.Module):
    """A decoder layer with adapter blocks run in front of it.

    Args:
        layer: the original decoder layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.blocks: list[tuple[str, nn.Module]] = []  # plain list: not part of this module's parameters
        self._register_state_dict_hook(_strip_layer_prefix)
        self._register_load_state_dict_pre_hook(_add_layer_prefix)

    def prepare(self, ctx: DecoderContext) -> None:
        """Compute what the blocks keep from their media (cross-attention K/V) ahead of the forward, so a
        recomputation of this layer in the backward (activation checkpointing) repeats the forward exactly."""
        for modality, block in self.blocks:
            media = ctx.extras.get(modality)
            if media is not None and hasattr(block, "media_kv"):
                block.media_kv(media)

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        for modality, block in self.blocks:
            media = ctx.extras.get(modality)
            if media is not None:
                x = block(x, media, ctx)
        return self.layer(x, ctx)


def _strip_layer_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "layer.")]:
        state_dict[prefix + key[len(prefix) + len("layer.") :]] = state_dict.pop(key)


def _add_layer_prefix(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "layer.")]:
        state_dict[prefix + "layer." + key[len(prefix) :]] = state_dict.pop(key)


def fuse(layers: nn.ModuleList, adapter: nn.Module) -> None:
    """Put ``adapter.blocks[i]`` in front of ``layers[adapter.layers[i]]``, wrapping layers as needed."""
    n = len(layers)
    for index, block in zip(adapter.layers, adapter.blocks, strict=True):
        if not 0 <= index < n:
            raise ValueError(f"{adapter.modality} adapter places a block at layer {index}, the backbone has {n} layers")
        if not isinstance(layers[index], FusedLayer):
            layers[index] = FusedLayer(layers[index])
        layers[index].blocks.append((adapter.modality, block))


def unfuse(layers: nn.ModuleList, adapter: nn.Module) -> None:
    """Remove the adapter's blocks; layers left without blocks are unwrapped to the original module."""
    ids = {id(b) for b in adapter.blocks}
    for i, layer in enumerate(layers):
        if isinstance(layer, FusedLayer):
            layer.blocks = [(m, b) for m, b in layer.blocks if id(b) not in ids]
            if not layer.blocks:
                layers[i] = layer.layer
