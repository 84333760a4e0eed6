"""The ``sensorium`` command.

Subcommands:
    generate  continue a prompt (or answer a chat turn) with a backbone, streaming tokens to stdout.
    demo      the embedded default end to end (for now: load SmolLM2 and chat one turn).

Errors caused by input (missing or malformed checkpoints, bad options) print one line
``sensorium: error: ...`` and exit with status 2; ``SENSORIUM_DEBUG=1`` shows the traceback.
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence

from sensorium.errors import SensoriumError

_DTYPES = ("float32", "bfloat16", "float16")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="compute dtype (default: float32)")


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
    g.add_argument("--system", default=None, help="system message for --chat")
    _add_generation_options(g)

    d = sub.add_parser("demo", help="run the embedded default end to end", description="Run the embedded default.")
    d.add_argument("--prompt", default="What is the capital of France?", help="the question to ask")
    _add_generation_options(d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sensorium`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "demo":
            return _demo(args)
        raise AssertionError(f"unhandled command {args.command}")
    except SensoriumError as e:
        if os.environ.get("SENSORIUM_DEBUG"):
            raise
        print(f"sensorium: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsensorium: interrupted", file=sys.stderr)
        return 130


def _run_generation(backbone_path: str, tokenizer_path: str, args: argparse.Namespace, *, chat: bool,
                    system: str | None) -> str:
    import torch

    from sensorium.backbone import TextStreamer, generate, load_backbone, load_tokenizer

    model = load_backbone(backbone_path, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(tokenizer_path)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = tokenizer.apply_chat_template(messages)
    else:
        prompt = tokenizer.encode(args.prompt)
    streamer = TextStreamer(tokenizer.decode)
    t0 = time.perf_counter()
    out = generate(
        model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        stop_ids=tokenizer.stop_ids, seed=args.seed, on_token=streamer,
    )[0]
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{len(out)} tokens in {dt:.2f} s, {len(out) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return tokenizer.decode(out)


def _generate(args: argparse.Namespace) -> int:
    from sensorium.backbone import embedded_backbone_path

    backbone = args.backbone or str(embedded_backbone_path())
    _run_generation(backbone, args.tokenizer or backbone, args, chat=args.chat, system=args.system)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sensorium.backbone import embedded_backbone_path

    path = str(embedded_backbone_path())
    print(f"backbone: {path}", file=sys.stderr)
    print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
    _run_generation(path, path, args, chat=True, system=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
