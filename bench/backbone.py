"""Backbone forward and greedy decoding: sensorium against transformers' LlamaForCausalLM, same weights.

Run:  python bench/backbone.py [--models tiny smollm2] [--new-tokens 128] [--repeats 5]

For each model it times, in this one process and on the same token ids:
  * forward: logits for a batch of prompts (no cache), median over repeats;
  * greedy decode: one prompt, N new tokens (EOS ignored), KV cache on both sides.
It checks that both produce the same greedy tokens, then prints times and the ratio transformers/sensorium
(> 1 means sensorium is faster).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pair(name: str, folder: Path):
    import transformers

    from sensorium import embedded_backbone_path, load_backbone

    if name == "smollm2":
        gguf = embedded_backbone_path()
        ours = load_backbone(gguf)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
        )
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg)
        hf.save_pretrained(folder / "tiny")
        ours = load_backbone(folder / "tiny")
    return ours.eval(), hf.eval()


def bench(name: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, folder: Path) -> list[str]:
    from sensorium import generate

    ours, hf = _pair(name, folder)
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    prompt = tokens[:1]
    rows = []
    with torch.inference_mode():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-3, rtol=0)
        t_ours = _median_time(lambda: ours(tokens), repeats)
        t_hf = _median_time(lambda: hf(tokens).logits, repeats)
        rows.append(f"| {name} | forward B={batch} T={prompt_len} | {batch * prompt_len / t_ours:,.0f} tok/s | "
                    f"{batch * prompt_len / t_hf:,.0f} tok/s | {t_hf / t_ours:.2f}x |")

        ours_out = generate(ours, prompt.tolist(), max_new_tokens=new_tokens)[0]
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
        same = ours_out == hf_out
        t_ours = _median_time(lambda: generate(ours, prompt.tolist(), max_new_tokens=new_tokens), repeats)
        t_hf = _median_time(
            lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
            repeats,
        )
        rows.append(f"| {name} | greedy decode {new_tokens} tokens (same tokens: {same}) | "
                    f"{new_tokens / t_ours:,.1f} tok/s | {new_tokens / t_hf:,.1f} tok/s | {t_hf / t_ours:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, fp32")
    print("| model | measure | sensorium | transformers | ratio |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for row in bench(name, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             repeats=args.repeats, folder=Path(tmp)):
                print(row, flush=True)


if __name__ == "__main__":
    main()
