"""Image encoder: any timm model, multi-layer features, local weights only, frozen by default.

ViTs give patch tokens from several blocks concatenated along channels (as the Llama 3 paper does);
CNNs give the feature maps of their last stages flattened to tokens, each stage in its own channel
block (zeros elsewhere), so a linear map after it acts as one projection per stage.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from sensorium.encoders.base import Features, FrozenMixin
from sensorium.errors import CheckpointError, MediaError


@dataclass
class ImageEncoderSpec:
    """Which image encoder to build and how to feed it.

    Args:
        name: timm model name (``vit_tiny_patch16_224``, ``resnet10t``, ``vit_huge_patch14_224``...).
        checkpoint: local weights (safetensors, or a ``weights_only`` torch file); random when None.
        layers: ViT block indices or CNN stage indices (timm ``forward_intermediates``) whose outputs are
            concatenated; negative indices count from the end.
        image_size: square input side in pixels.
        mean: per-channel mean for normalisation (timm's data config when None).
        std: per-channel std (timm's data config when None).
        frozen: no gradients and eval mode during training.
    """

    name: str = "resnet10t"
    checkpoint: str | None = None
    layers: list[int] = field(default_factory=lambda: [-2, -1])
    image_size: int = 112
    mean: list[float] | None = None
    std: list[float] | None = None
    frozen: bool = True


class ImageEncoder(FrozenMixin):
    """A timm backbone returning :class:`Features` ``(B, N, out_dim)`` for a batch of images.

    Args:
        spec: what to build (see :class:`ImageEncoderSpec`).
    """

    def __init__(self, spec: ImageEncoderSpec) -> None:
        super().__init__()
        import timm

        self.spec = spec
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
        try:
            self.model = timm.create_model(spec.name, img_size=spec.image_size, **kwargs)
        except TypeError:  # CNNs take any size and have no img_size argument
            self.model = timm.create_model(spec.name, **kwargs)
        self.is_vit = hasattr(self.model, "blocks") and hasattr(self.model, "num_prefix_tokens")
        n_stages = len(self.model.blocks) if self.is_vit else len(self.model.feature_info)
        self.indices = sorted({i % n_stages for i in spec.layers})
        if self.is_vit:
            self.channels = [self.model.embed_dim] * len(self.indices)
        else:
            self.channels = [self.model.feature_info[i]["num_chs"] for i in self.indices]
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean = list(spec.mean or cfg["mean"])
        self.std = list(spec.std or cfg["std"])
        if not self.is_vit:
            self.model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (measured ~1.2x)
        if spec.checkpoint:
            self.load_weights(spec.checkpoint)
        if spec.frozen:
            self.freeze()

    @property
    def out_dim(self) -> int:
        return sum(self.channels)

    def num_tokens(self) -> int:
        """Tokens per image at ``spec.image_size``."""
        s = self.spec.image_size
        with torch.no_grad():
            device = next(self.parameters()).device
            return self(torch.zeros(1, 3, s, s, device=device)).values.shape[1]

    def load_weights(self, path: str | Path) -> None:
        """Load timm weights from a local file; classifier heads in the file are ignored."""
        state = read_weights(Path(path))
        state = {k.removeprefix("model."): v for k, v in state.items()}
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(state))
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} weights of {self.spec.name} are missing (e.g. {missing[:3]})")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, {self.spec.name} needs {tuple(own[k].shape)}")
        self.model.load_state_dict(state)

    def forward(self, pixels: torch.Tensor) -> Features:
        """Features of normalised images ``(B, 3, H, W)``."""
        if self.is_vit:
            maps = self.model.forward_intermediates(
                pixels, indices=self.indices, intermediates_only=True, output_fmt="NLC"
            )  # each (B, N, C)
            values = torch.cat(maps, dim=-1)  # (B, N, C * layers)
        else:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            maps = self.model.forward_intermediates(pixels, indices=self.indices, intermediates_only=True)
            blocks, offset = [], 0
            for m in maps:
                B, C = m.shape[:2]
                tokens = m.flatten(2).transpose(1, 2)  # (B, H*W, C)
                blocks.append(nn.functional.pad(tokens, (offset, self.out_dim - offset - C)))  # (B, H*W, out_dim)
                offset += C
            values = torch.cat(blocks, dim=1)  # (B, N, out_dim)
        mask = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
        return Features(values, mask)

    def preprocess(self, raw: "Image.Image | np.ndarray | torch.Tensor | str | Path") -> torch.Tensor:
        """One image (PIL, HWC uint8 array, CHW float tensor in [0, 1], or a path) → ``(3, S, S)`` normalised."""
        return self.transform(raw)

    @property
    def transform(self) -> "ImagePreprocess":
        """The preprocessing as a small picklable object (for DataLoader workers)."""
        return ImagePreprocess(self.spec.image_size, self.mean, self.std)

    def weights(self) -> dict[str, torch.Tensor]:
        """Weights in the layout ``spec.checkpoint`` loads."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def spec_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder and its preprocessing (for adapter manifests)."""
        d = asdict(self.spec)
        d.update(kind="image", mean=self.mean, std=self.std, out_dim=self.out_dim)
        return d


class ImagePreprocess:
    """Resize to a square (no crop: positions in the frame matter) and normalise.

    Args:
        size: output side in pixels.
        mean: per-channel mean.
        std: per-channel std.
    """

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __call__(self, raw: "Image.Image | np.ndarray | torch.Tensor | str | Path") -> torch.Tensor:
        img = load_image(raw) if isinstance(raw, (str, Path)) else raw
        s = self.size
        if isinstance(img, torch.Tensor):
            if img.ndim != 3 or img.shape[0] not in (1, 3):
                raise MediaError(f"image tensor must be (C, H, W) with C in (1, 3), got {tuple(img.shape)}")
            x = img.float().expand(3, -1, -1)
            x = nn.functional.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
        else:
            if isinstance(img, np.ndarray):
                if img.ndim not in (2, 3) or img.dtype != np.uint8:
                    raise MediaError(f"image array must be HxW or HxWxC uint8, got {img.shape} {img.dtype}")
                img = Image.fromarray(img)
            if not isinstance(img, Image.Image):
                raise MediaError(f"cannot read an image from {type(img).__name__}")
            if img.size != (s, s):
                img = img.resize((s, s), Image.BILINEAR)
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(arr).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully; a missing, truncated, huge or non-image file is a MediaError naming it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MediaError(f"{p}: cannot read ({e.strerror or e})") from e
    return decode_image_bytes(data, name=str(p))


def decode_image_bytes(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes (from a shard) fully, or raise MediaError naming ``name``."""
    import io

    if not data:
        raise MediaError(f"{name}: zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{name}: {im.width}x{im.height} pixels is more than {MAX_IMAGE_PIXELS}")
            im.load()
            return im.convert("RGB")
    except MediaError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name}: not a readable image ({e})") from e


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a ``weights_only`` torch file (never unpickles code)."""
    from sensorium.backbone.checkpoint import read_safetensors, torch_load_weights

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return torch_load_weights(path)


def save_encoder(encoder: ImageEncoder, path: str | Path) -> Path:
    """Write the encoder's timm weights to ``path`` (safetensors) with its spec as metadata."""
    from sensorium.adapters.artifact import atomic_save_safetensors

    p = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.model.state_dict().items()}
    spec = asdict(encoder.spec) | {"checkpoint": None}
    atomic_save_safetensors(state, p, metadata={"sensorium.encoder": json.dumps(spec)})
    return p
