"""Loading the embedded SmolLM2 GGUF: sensorium against the ``gguf`` package and transformers' GGUF loader.

Run:  python bench/gguf_load.py [--repeats 3] [--no-transformers]

Times, in this one process and in turns (A, B, ...), what each side needs before it can run the model:
  * sensorium: ``load_backbone`` + ``load_tokenizer`` of the GGUF file (fp32);
  * gguf package: ``GGUFReader`` + ``gguf.quants.dequantize`` of every tensor to float32 (the weights alone,
    before any model is built or tokenizer read: a lower bound for a loader built on it);
  * transformers: ``AutoModelForCausalLM`` + ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` (fp32).
It checks that sensorium's weights equal the gguf package's, then prints the median seconds and the ratio
peer / sensorium (> 1: sensorium is faster).
"""

import argparse

import numpy as np
import torch
from harness import interleaved, median, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers' loader out")
    args = parser.parse_args()

    import gguf
    from gguf.quants import dequantize

    import sensorium

    path = sensorium.embedded_backbone_path()

    def ours():
        return sensorium.load_backbone(path), sensorium.load_tokenizer(path)

    def gguf_package():
        reader = gguf.GGUFReader(str(path))
        return {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}

    def hf():
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        return model, transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    model, _ = ours()
    weights = gguf_package()
    embed = torch.from_numpy(weights["token_embd.weight"].reshape(model.config.vocab_size, -1))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], embed), "embedding weights differ"
    fns = {"sensorium": ours, "gguf package (weights only)": gguf_package}
    if not args.no_transformers:
        fns["transformers"] = hf
    times = interleaved(fns, args.repeats)
    base = median(times["sensorium"])
    print(f"{path.name}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'loader':<30} {'seconds':>8}  {'spread':>12}  {'peer / sensorium':>16}")
    for name, ts in times.items():
        ratio = "" if name == "sensorium" else f"{median(ts) / base:.2f}x"
        print(f"{name:<30} {median(ts):>8.2f}  {spread(ts):>12}  {ratio:>16}")


if __name__ == "__main__":
    main()
