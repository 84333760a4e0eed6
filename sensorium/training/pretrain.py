"""Encoder pretraining for the embedded default: no pretrained encoder can be fetched offline, and a
frozen random one loses most of what the adapter needs, so the small encoders first learn the synthetic
data with their own objective and are then frozen for adapter training (the paper's order).

Images: attribute classification (colour, shape, size, position) and regression of the shape's centre
(x, y) from mean-pooled encoder tokens. The pooling is permutation-invariant, so every token has to carry
what it sees, position included — which is what a cross-attention adapter, with no positional encoding
on media, needs (and what a video adapter needs to tell the direction of motion).
"""

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from sensorium.data.shards import SampleDecoder, image_sample_decoder
from sensorium.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES
from sensorium.encoders.image import ImageEncoder, ImageEncoderSpec, save_encoder
from sensorium.training.modules import warmup_cosine

SHAPES_ATTRIBUTES: dict[str, list[str]] = {
    "colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS),
}


class AttributeCollator:
    """Decoded image samples → ``{"images": (B, 3, S, S), "labels": {name: (B,)}, "targets": {name: (B,)}, "bad"}``.

    Args:
        attributes: categorical attribute → class names.
        regress: numeric attributes (floats in the sample's ``attributes``).
    """

    def __init__(self, attributes: Mapping[str, Sequence[str]], regress: Sequence[str] = ()) -> None:
        self.index = {k: {v: i for i, v in enumerate(vs)} for k, vs in attributes.items()}
        self.regress = list(regress)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        good, bad = [], []
        for s in samples:
            attrs = s.get("attributes") or {}
            if "__bad__" in s:
                bad.append((s.get("__url__"), s.get("__key__"), s["__bad__"]))
            elif len(s.get("media", {}).get("image", [])) != 1 or any(attrs.get(k) not in v for k, v in self.index.items()) \
                    or any(not isinstance(attrs.get(k), (int, float)) for k in self.regress):
                bad.append((s.get("__url__"), s.get("__key__"), "needs one image and known attributes"))
            else:
                good.append(s)
        images = torch.stack([s["media"]["image"][0] for s in good]) if good else torch.zeros(0)
        labels = {k: torch.tensor([v[s["attributes"][k]] for s in good], dtype=torch.long) for k, v in self.index.items()}
        targets = {k: torch.tensor([float(s["attributes"][k]) for s in good]) for k in self.regress}
        return {"images": images, "labels": labels, "targets": targets, "bad": bad}


class EncoderPretrainModule(L.LightningModule):
    """What the encoder-pretraining modules share: one ``_step(batch, stage)`` for train/val/test, AdamW with
    warm-up and cosine decay, and the trained encoder written at the end (``export_adapter``)."""

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup=self.hparams.warmup_steps, total=total, min_ratio=0.02)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_adapter(self) -> Path:
        """Write the encoder weights (called by the export callback like an adapter's)."""
        raise NotImplementedError

    def on_train_end(self) -> None:
        print(f"encoder written to {self.export_adapter()}", file=sys.stderr)


class ImageEncoderPretrainModule(EncoderPretrainModule):
    """Train an image encoder to classify the synthetic attributes; save it as safetensors at the end.

    Args:
        encoder: the encoder to train (``frozen`` is ignored: it trains here).
        out: where the trained encoder's weights are written.
        attributes: attribute name → class names (default: the shapes set's).
        regress: numeric attributes to regress (default: the shape's centre ``x``, ``y``).
        regress_weight: weight of the regression (MSE) losses against the classification losses.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (then cosine over ``trainer.max_steps``).
    """

    def __init__(
        self,
        encoder: ImageEncoderSpec | None = None,
        out: str = "runs/image/encoder/encoder.safetensors",
        attributes: dict[str, list[str]] | None = None,
        regress: list[str] | None = None,
        regress_weight: float = 1.0,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        spec = encoder or ImageEncoderSpec()
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = asdict(spec)  # plain data: checkpoints load with weights_only=True
        spec = ImageEncoderSpec(**{**spec.__dict__, "frozen": False, "checkpoint": spec.checkpoint})
        self.encoder = ImageEncoder(spec)
        self.attributes = attributes or SHAPES_ATTRIBUTES
        self.regress = ["x", "y"] if regress is None else list(regress)
        self.heads = nn.ModuleDict({k: nn.Linear(self.encoder.out_dim, len(v)) for k, v in self.attributes.items()})
        self.regressors = nn.ModuleDict({k: nn.Linear(self.encoder.out_dim, 1) for k in self.regress})

    def sample_decoder(self) -> SampleDecoder:
        return image_sample_decoder(self.encoder.transform)

    def collator(self) -> AttributeCollator:
        return AttributeCollator(self.attributes, self.regress)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if len(batch["images"]) == 0:
            return None
        pooled = self.encoder(batch["images"]).values.mean(1)  # (B, D)
        loss = 0.0
        for k, head in self.heads.items():
            logits = head(pooled)
            y = batch["labels"][k]
            loss = loss + F.cross_entropy(logits, y)
            self.log(f"{stage}/acc_{k}", (logits.argmax(-1) == y).float().mean(), batch_size=len(y),
                     prog_bar=k == "shape")
        for k, head in self.regressors.items():
            pred, y = head(pooled).squeeze(-1), batch["targets"][k]
            loss = loss + self.hparams.regress_weight * F.mse_loss(pred.float(), y)  # fractions of the side
            self.log(f"{stage}/mae_{k}", (pred - y).abs().mean(), batch_size=len(y))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def export_adapter(self) -> Path:
        """Write the encoder weights (called by the export callback like an adapter's)."""
        return save_encoder(self.encoder, self.hparams.out)
