"""Training epoch on cached encoder features against an epoch on raw media (decode + frozen encoder + step).

Run:  python bench/feature_cache.py [--images 256] [--backbone tiny|smollm2] [--batch 16] [--repeats 2]
                                    [--encoder vit_small_patch16_224] [--layers 3 7 11] [--workers 0]

One process, one model: a frozen backbone with a gated cross-attention image adapter (every 4th layer) and a
frozen timm ViT-S/16 image encoder (random weights: only its cost matters here) giving the patch tokens of
several blocks concatenated, as sensorium's ImageEncoder does (blocks 3, 7 and 11: 196 tokens x 1152).
The data are ``--images`` synthetic shapes images (``sensorium.data.synthetic``, drawn at IMAGE_SIZE = 112 px
and resized to 224 px by the encoder's preprocessing) with their captions, in webdataset shards.

* raw epoch: shards → JPEG decode + resize + normalise → chat collation → encoder forward (no grad) →
  adapter fwd + bwd + AdamW step, for every batch;
* cached epoch: the same, reading the shards that ``sensorium.data.features.write_features`` wrote once
  (one float32 ``.npy`` of encoder tokens per image) instead of decoding and encoding.

The one-off caching time is reported beside the epochs, not inside them. Both pipelines read the shards in
order (no shuffle), so their batches match; the script checks that the first batch gives the same loss on
both before timing. Epochs interleave (raw, cached, raw, cached, ...) and medians are reported; the ratio is
raw time / cached time. ``--backbone tiny`` is a random 4-layer, 64-wide Llama with SmolLM2's vocabulary;
``smollm2`` is the embedded SmolLM2-135M-Instruct. Batches are collated in the main process
(``--workers 0``) unless asked otherwise.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import interleaved, median, spread, top_ops


def build(backbone: str, encoder_name: str, layers: list[int]):
    from sensorium import ComposedModel, embedded_backbone_path, load_backbone, load_tokenizer
    from sensorium.adapters import CrossAttentionAdapter, CrossAttentionConfig
    from sensorium.backbone import Llama, LlamaConfig
    from sensorium.encoders import ImageEncoder, ImageEncoderSpec

    path = embedded_backbone_path()
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    if backbone == "smollm2":
        bb = load_backbone(path)
    else:
        bb = Llama(LlamaConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
        with torch.no_grad():
            for p in bb.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02)
    encoder = ImageEncoder(ImageEncoderSpec(name=encoder_name, layers=layers, image_size=224))
    adapter = CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, encoder.out_dim, every=4))
    return ComposedModel(bb, [adapter], encoders={"image": encoder}, tokenizer=tokenizer)


def loader(model, root: Path, *, features: bool, batch: int, workers: int):
    from torch.utils.data import DataLoader

    from sensorium.data.collate import ChatCollator
    from sensorium.data.features import FeatureSampleDecoder
    from sensorium.data.shards import image_sample_decoder, sample_pipeline

    decode = FeatureSampleDecoder("image") if features else image_sample_decoder(model.encoders["image"].transform)
    collate = ChatCollator(model.tokenizer, {"image": model.placeholder_ids["image"]}, tokens_per_item={"image": 1},
                           prompt="Describe the image.", system="", max_len=64, features=features)
    ds = sample_pipeline(root / "train", decode, shuffle=0, batch_size=batch)
    return DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers)


def loss(model, batch) -> torch.Tensor:
    return model(batch.tokens, media=batch.media, labels=batch.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--encoder", default="vit_small_patch16_224")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 7, 11])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of one batch of each epoch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from sensorium.data.features import write_features
    from sensorium.data.shards import image_sample_decoder
    from sensorium.data.synthetic import IMAGE_SIZE, make_dataset

    model = build(args.backbone, args.encoder, args.layers)
    encoder = model.encoders["image"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    print(f"torch {torch.__version__}, {args.threads} threads; backbone {args.backbone}, encoder {args.encoder} "
          f"blocks {args.layers} ({encoder.num_tokens()} tokens x {encoder.out_dim}); images drawn at {IMAGE_SIZE} px, "
          f"encoded at {encoder.spec.image_size} px; batch {args.batch}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset("shapes", Path(tmp) / "shapes", num=args.images, seed=0)
        t0 = time.perf_counter()
        feats = write_features(encoder, image_sample_decoder(encoder.transform), root, Path(tmp) / "features",
                               modality="image", splits=("train",), batch_size=args.batch)
        t_cache = time.perf_counter() - t0
        raw = loader(model, root, features=False, batch=args.batch, workers=args.workers)
        cached = loader(model, feats, features=True, batch=args.batch, workers=args.workers)

        with torch.no_grad():
            a = loss(model, next(iter(raw))).item()
            b = loss(model, next(iter(cached))).item()
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"first-batch losses differ: raw {a}, cached {b}"

        def step(batch) -> None:
            opt.zero_grad(set_to_none=True)
            loss(model, batch).backward()
            opt.step()

        def epoch(dl) -> int:
            n = 0
            for batch in dl:
                step(batch)
                n += len(batch)
            return n

        assert epoch(raw) == epoch(cached) == args.images, "both epochs must see every image"  # also a warm-up
        times = interleaved({"raw": lambda: epoch(raw), "cached": lambda: epoch(cached)}, args.repeats, warmup=0)
        t_raw, t_feat = median(times["raw"]), median(times["cached"])
        print(f"epoch times (s): raw {spread(times['raw'])}, cached {spread(times['cached'])}; "
              f"first-batch loss {a:.5f} on both", flush=True)
        if args.profile:
            for name, dl in (("raw", raw), ("cached", cached)):
                first = next(iter(dl))
                print(f"\n--- profile: one {name} batch (collated), step only ---\n{top_ops(lambda b=first: step(b))}")
    n = args.images
    print("\n| backbone | measure | cached features | raw media | ratio |\n|---|---|---|---|---|")
    print(f"| {args.backbone} | training epoch, {n} images, batch {args.batch} | {t_feat:.1f} s ({n / t_feat:,.0f} img/s) | "
          f"{t_raw:.1f} s ({n / t_raw:,.0f} img/s) | {t_raw / t_feat:.2f}x |")
    print(f"| {args.backbone} | one-off caching (decode + encode + write {n} images) | {t_cache:.1f} s | | |")


if __name__ == "__main__":
    main()
