"""Training step on batches that start with earlier turns: shared prefix computed once vs run in every row.

Run:  python bench/shared_prefix.py [--modality speech|video] [--batches 4] [--repeats 2] [--data DIR]

One process, one model: the speech or video training module of the recipes on the embedded
SmolLM2-135M-Instruct (speech: the recipe's conformer encoder; video: resnet10t on 8 frames with the
recipe's perceiver; both with random encoder weights, only their cost matters here), fp32. The batches are
``--batches`` batches of 16 from a generated synthetic set (spoken words or moving shapes), collated by the
module's training collator with ``context_turns 1`` (every batch starts with one or two earlier text-only
turns, the same for all its chats, as training draws them) and with ``context_turns 0`` (one-turn chats).

Each step is the model's loss (forward) and its backward, no optimiser:

* ``shared``: the default, the earlier turns' keys and values computed once, as one row, without gradients;
* ``per row``: ``model.share_prefix = False``, the earlier turns run in every row with the rest;
* ``one turn``: the same samples without earlier turns (what a step costs without them).

Steps are timed in turns (shared, per row, one turn, ...) and medians are reported; the ratio is per row /
shared. The script first checks that both context variants give the same loss on the first batch.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import interleaved, median, spread

RECIPE = {  # the recipes' module settings that shape the step (recipes/speech/spoken_words.yaml, recipes/video/moving_shapes.yaml)
    "speech": dict(max_len=160),
    "video": dict(num_frames=8, group=8, num_latents=16, perceiver_depth=2, every=4, max_len=160),
}


def build(modality: str):
    from sensorium.encoders import ImageEncoderSpec
    from sensorium.encoders.speech import SpeechEncoderSpec
    from sensorium.training import SpeechAdapterModule, VideoAdapterModule

    torch.manual_seed(0)
    if modality == "speech":
        spec = SpeechEncoderSpec(dim=144, num_layers=4, num_heads=4, ffn_dim=576, kernel_size=15, max_seconds=10.0,
                                 truncate=False)
        return SpeechAdapterModule(encoder=spec, **RECIPE["speech"])
    return VideoAdapterModule(encoder=ImageEncoderSpec(name="resnet10t", layers=[-1], image_size=112), **RECIPE["video"])


def batches(module, root: Path, n: int, context: float) -> list:
    from sensorium.data.shards import sample_pipeline

    collate = module.collator()
    collate.context_turns = context
    samples = iter(sample_pipeline(root / "train", module.sample_decoder()))
    out = []
    for _ in range(n):
        out.append(collate([next(samples) for _ in range(16)]))
    return out


def step(model, batch, *, share: bool) -> float:
    model.share_prefix = share
    model.zero_grad(set_to_none=True)
    loss = model(batch.tokens, media=batch.media, labels=batch.labels)
    loss.backward()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", choices=["speech", "video"], default="speech")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, help="a generated set to reuse (default: generate one in a temporary folder)")
    args = ap.parse_args()

    from sensorium.data.synthetic import make_dataset

    name = {"speech": "spoken-words", "video": "moving-shapes"}[args.modality]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / name
        if args.data is None:
            t0 = time.perf_counter()
            make_dataset(name, root, num=16 * args.batches, num_eval=8)
            print(f"generated {16 * args.batches} {name} samples in {time.perf_counter() - t0:.1f} s")
        module = build(args.modality)
        model = module.model.train()
        context, plain = batches(module, root, args.batches, 1.0), batches(module, root, args.batches, 0.0)

        from sensorium.compose import shared_prefix_length

        ph = model.placeholder_ids.values()
        shared = [shared_prefix_length(b.tokens, b.labels, ph) for b in context]
        lengths = [b.tokens.shape[1] for b in context]
        print(f"{args.modality}: batches of 16, lengths with earlier turns {lengths}, shared prefixes {shared}, "
              f"one-turn lengths {[b.tokens.shape[1] for b in plain]}")
        a, b = step(model, context[0], share=True), step(model, context[0], share=False)
        assert abs(a - b) <= 1e-4 * abs(b), f"shared prefix changed the loss: {a} vs {b}"
        print(f"first batch loss: shared {a:.6f}, per row {b:.6f}")

        def run(share: bool, data: list) -> None:
            for batch in data:
                step(model, batch, share=share)

        times = interleaved({"shared": lambda: run(True, context), "per row": lambda: run(False, context),
                             "one turn": lambda: run(True, plain)}, args.repeats)
    per = {k: median(v) / args.batches for k, v in times.items()}
    print()
    print(f"| {args.modality} step (fwd + bwd, batch 16, median of {args.repeats}) | s/step | range (s per {args.batches}) |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {per[k]:.2f} | {spread(v)} |")
    print(f"\nper row / shared: {per['per row'] / per['shared']:.2f}x; "
          f"earlier turns cost {per['per row'] / per['one turn']:.2f}x a one-turn step per row, "
          f"{per['shared'] / per['one turn']:.2f}x shared")


if __name__ == "__main__":
    main()
