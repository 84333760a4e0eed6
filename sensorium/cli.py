"""The ``sensorium`` command.

Subcommands:
    fit, validate, test, predict   Lightning CLI over a YAML recipe: ``sensorium fit --config R.yaml``.
    data      write a synthetic data set as webdataset shards (shapes, moving-shapes, spoken-words).
    features  run a recipe's frozen encoder once over its shards and write the outputs as feature shards.
    generate  continue a prompt or answer a chat turn, optionally with adapters and media.
    import    convert another model's checkpoint (mllama: Llama 3.2 Vision) into a backbone + adapter.
    eval      run an evaluation recipe: metrics, predictions and an HTML report for a test split.
    demo      the embedded default end to end: data, encoders, three adapters, composition, evaluation, report.

Errors caused by input (missing or malformed checkpoints, bad options) print one line
``sensorium: error: ...`` and exit with status 2; ``SENSORIUM_DEBUG=1`` shows the traceback.
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence

from sensorium.demo import EVAL_MINUTES as DEMO_EVAL_MINUTES
from sensorium.demo import MINUTES as DEMO_MINUTES
from sensorium.errors import SensoriumError

_DTYPES = ("float32", "bfloat16", "float16")
SYNTHETIC_SETS = ("shapes", "moving-shapes", "spoken-words", "shapes-instruct", "moving-shapes-instruct",
                  "spoken-words-instruct")  # sensorium.data.synthetic.GENERATORS (not imported: keeps --help fast)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="compute dtype (default: float32)")


def _medium(kind: str):
    """argparse type: a path tagged with its media kind (``("audio", path)``)."""

    def tag(path: str) -> tuple[str, str]:
        return kind, path

    tag.__name__ = kind  # argparse names the type in its messages
    return tag


def _alpha(text: str) -> float:
    """argparse type: a finite number >= 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensorium", description="Teach a frozen language model to see, watch and listen."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text with a backbone", description="Generate text with a backbone.")
    g.add_argument("--backbone", help="HF folder, Meta folder or .gguf file (default: the embedded SmolLM2)")
    g.add_argument("--tokenizer", help="tokenizer.json, its folder or a .gguf (default: from --backbone)")
    g.add_argument("--prompt", required=True, help="the prompt text (the user turn with --chat)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--system", default=None, help="system message for --chat ('' for none; default: the adapter's)")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR", help="adapter folder (repeatable)")
    # one list for all media, so they reach the prompt in command-line order
    g.add_argument("--image", dest="media", action="append", default=[], metavar="PATH", type=_medium("image"),
                   help="image file (repeatable); each adds an image before the prompt (implies --chat)")
    g.add_argument("--video", dest="media", action="append", metavar="PATH", type=_medium("video"),
                   help="video clip (repeatable); each adds a clip before the prompt (implies --chat)")
    g.add_argument("--audio", dest="media", action="append", metavar="PATH", type=_medium("audio"),
                   help="audio file read with soundfile (wav, flac, ogg; repeatable); each adds an utterance "
                   "before the prompt for the speech adapter (implies --chat)")
    g.add_argument("--contrastive-alpha", type=_alpha, default=0.0, metavar="A",
                   help="contrastive decoding weight: tokens come from (1 + A) * logits with the media - A * logits "
                   "without them (CM3Leon-style classifier-free guidance; costs a second batch half). "
                   "0 = plain decoding (default)")
    _add_generation_options(g)

    dd = sub.add_parser("data", help="write a synthetic data set", description="Write a synthetic data set as "
                        "webdataset shards with train/val/test splits: shapes (captioned images), moving-shapes "
                        "(captioned clips), spoken-words (16 kHz speech synthesised with eSpeak NG, with "
                        "transcripts and French translations), and their *-instruct variants (multi-turn "
                        "question-answer chats for instruction tuning).")
    dd.add_argument("name", choices=list(SYNTHETIC_SETS), help="which set")
    dd.add_argument("--out", required=True, help="output folder")
    dd.add_argument("--num", type=_count, default=None,
                    help="training samples (default: 4000 images, clips or utterances; 1000 chats)")
    dd.add_argument("--num-eval", type=_count, default=None,
                    help="validation and test samples each (default: at least 128 and 256, a twentieth and a "
                    "tenth of --num)")
    dd.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    sub.add_parser("features", help="cache a recipe's frozen encoder outputs as feature shards", add_help=False)

    ev = sub.add_parser("eval", help="evaluate adapters on a test split: metrics, predictions, an HTML report",
                        description="Run an evaluation recipe (recipes/eval/*.yaml): compose the backbone and "
                        "adapters, answer the split's samples (greedy), score them for the recipe's task (captions: "
                        "CIDEr-D, BLEU-4, attribute accuracy; video QA: accuracy; ASR: WER; speech translation: "
                        "BLEU) and write OUT/metrics.json, OUT/predictions.jsonl and OUT/report.html.")
    ev.add_argument("--config", required=True, metavar="FILE", help="the evaluation recipe (YAML)")
    ev.add_argument("--out", metavar="DIR", help="output folder (default: the recipe's out)")
    ev.add_argument("--max-samples", type=int, metavar="N", help="evaluate the first N samples only")

    im = sub.add_parser("import", help="convert another model's checkpoint into a backbone and an adapter",
                        description="Convert a transformers MllamaForConditionalGeneration folder (Llama 3.2 "
                        "Vision) into DIR/backbone (a HF Llama folder with the self-attention layers) and "
                        "DIR/adapter (a sensorium image cross-attention adapter: the cross-attention layers and "
                        "the multi-modal projector).")
    im.add_argument("format", choices=["mllama"], help="the source layout")
    im.add_argument("src", metavar="SRC", help="the checkpoint folder (config.json + *.safetensors)")
    im.add_argument("--out", required=True, metavar="DIR", help="output folder (its backbone/ and adapter/ are replaced)")

    d = sub.add_parser("demo", help="run the embedded default end to end", description="The embedded default end to "
                       "end: synthetic data, encoder pretraining, image/video/speech adapters on the frozen SmolLM2, "
                       "composition, evaluation of each modality alone and composed, one mixed-media conversation, "
                       "a table and an HTML report (within a time budget, --minutes; --quick: a few steps on small sets).")
    d.add_argument("--dir", default="sensorium-demo", help="working folder (data/, runs/, reports/; reused by a rerun)")
    d.add_argument("--quick", action="store_true", help="a few training steps on small sets: the pipeline, not quality")
    d.add_argument("--fresh", action="store_true", help="delete the working folder first")
    d.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="the full run's time budget: its training "
                   f"stages share it, less {DEMO_EVAL_MINUTES:g} minutes kept for the evaluation (default: "
                   f"{DEMO_MINUTES:g}; more trains longer)")
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sensorium`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _guarded(lambda: _lightning(argv))
    if argv and argv[0] == "features":
        return _guarded(lambda: _features(argv[1:]))
    args = build_parser().parse_args(argv)
    return _guarded(lambda: _dispatch(args))


def _sensorium_cause(e: BaseException | None) -> SensoriumError | None:
    """The SensoriumError behind ``e`` (jsonargparse wraps errors raised while instantiating a recipe)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SensoriumError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _guarded(fn) -> int:
    try:
        return fn()
    except Exception as e:
        cause = _sensorium_cause(e)
        if cause is None or os.environ.get("SENSORIUM_DEBUG"):
            raise
        print(f"sensorium: error: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsensorium: interrupted", file=sys.stderr)
        return 130


def _lightning(argv: list[str]) -> int:
    import lightning as L
    import torch
    from lightning.pytorch.cli import LightningCLI

    torch.set_flush_denormal(True)  # denormals slow CPU kernels many-fold; restored below (process-global state)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # LightningCLI reads the command line itself
    try:
        LightningCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved
        torch.set_flush_denormal(False)
    return 0


def _features(argv: list[str]) -> int:
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    p = argparse.ArgumentParser(
        prog="sensorium features", description="Run a recipe's frozen encoder once over its data shards and write "
        "its outputs as feature shards; train on them with --data.features DIR. Other options override the recipe "
        "(e.g. --data.root DIR).")
    p.add_argument("--config", required=True, help="the adapter recipe (its model's encoder and its data)")
    p.add_argument("--out", required=True, help="output folder for the feature shards")
    args, rest = p.parse_known_args(argv)
    cli = LightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        run=False, args=["--config", args.config, *rest], save_config_callback=None, auto_configure_optimizers=False,
    )
    data = cli.datamodule
    if not hasattr(data, "cache_features"):
        raise SensoriumError(f"{args.config}: its data module ({type(data).__name__}) cannot cache features")
    data.ensure_source()
    out = data.cache_features(cli.model, args.out)
    print(f"features in {out}; train on them with --data.features {out}", file=sys.stderr)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return _generate(args)
    if args.command == "data":
        return _data(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "import":
        return _import(args)
    if args.command == "eval":
        return _eval(args)
    raise AssertionError(f"unhandled command {args.command}")


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _data(args: argparse.Namespace) -> int:
    from sensorium.data.synthetic import make_dataset

    out = make_dataset(args.name, args.out, num=args.num, seed=args.seed, num_eval=args.num_eval)
    print(f"wrote {args.name} to {out}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sensorium.eval.runner import EvalConfig, evaluate, metrics_table

    overrides = {k: v for k, v in (("out", args.out), ("max_samples", args.max_samples)) if v is not None}
    summary = evaluate(EvalConfig.from_yaml(args.config, **overrides))
    print(metrics_table(summary))
    return 0


def _import(args: argparse.Namespace) -> int:
    from sensorium.interop.mllama import import_mllama

    backbone, adapter = import_mllama(args.src, args.out)
    print(f"backbone: {backbone}\nadapter: {adapter}")
    return 0


def _run_generation(backbone_path: str, tokenizer_path: str, args: argparse.Namespace, *, chat: bool,
                    system: str | None, adapters: Sequence[str] = (), media: Sequence[tuple[str, str]] = ()) -> str:
    import torch

    from sensorium.backbone import TextStreamer, load_backbone, load_tokenizer
    from sensorium.compose import PART_TYPES, compose

    model = load_backbone(backbone_path, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(tokenizer_path)
    composed = compose(model, list(adapters), tokenizer=tokenizer)
    if system is None:  # the prompt format the adapters were trained with
        systems = {a.manifest_data.get("prompt", {}).get("system") for a in composed.adapters.values()}
        system = systems.pop() if len(systems) == 1 else None
    content: str | list[dict] = args.prompt
    for kind, path in media:
        modality = PART_TYPES[kind]
        if modality not in composed.adapters:
            have = ", ".join(sorted(composed.adapters)) or "none"
            raise SensoriumError(f"{path}: --{kind} needs a {modality} adapter (--adapter DIR); composed: {have}")
    if media:
        chat = True
        content = [{"type": kind, kind: path} for kind, path in media] + [{"type": "text", "text": args.prompt}]
    streamer = TextStreamer(tokenizer.decode)
    alpha = getattr(args, "contrastive_alpha", 0.0)
    t0 = time.perf_counter()
    if chat:
        text = composed.generate(
            [{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, system=system, on_token=streamer, contrastive_alpha=alpha,
        )
    else:
        ids = composed.generate_ids(
            [tokenizer.encode(args.prompt)], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, on_token=streamer, contrastive_alpha=alpha,
        )[0]
        text = tokenizer.decode(ids)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    n = len(streamer.ids)
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return text


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sensorium.backbone import embedded_backbone_path
    from sensorium.errors import MediaError

    for kind, path in args.media:  # before the backbone loads
        if not Path(path).is_file():
            raise MediaError(f"{path}: no such file (--{kind})")
    backbone = args.backbone or str(embedded_backbone_path())
    _run_generation(backbone, args.tokenizer or backbone, args, chat=args.chat, system=args.system,
                    adapters=args.adapter, media=args.media)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sensorium.demo import run_demo

    run_demo(args.dir, quick=args.quick, fresh=args.fresh, minutes=args.minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
