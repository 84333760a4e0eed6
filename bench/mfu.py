"""Image-adapter training throughput as a fraction of the machine's matmul peak (model FLOPs utilisation).

Run:  python bench/mfu.py [--batch 16] [--seq 40] [--labelled 12] [--repeats 5] [--bf16]     # CPU
      python bench/mfu.py --gpu [--peak-tflops 989]                                        # GPU, a few minutes
      python bench/mfu.py --gpu --shape tiny                                              # the GPU path, on CPU

CPU mode (default). Peak: the median FLOP/s of a 4096 x 4096 x 4096 fp32 matmul (``--bf16``: bf16) on
``--threads`` threads. Step: the embedded default image recipe's shape with random weights: SmolLM2-135M
(dim 576, 30 layers, vocab 49152, frozen) + a gated cross-attention adapter in front of every 4th layer
(8 blocks, LayerNorm + projection of 65 media tokens x 768, the resnet10t encoder's output), features given
precomputed; B=16 rows of T=40 tokens, the image placeholder at position 3, loss on the last 12 positions
(the shapes caption recipe gives 23 tokens with 9 labelled; instruction samples are longer); fwd + bwd +
AdamW. Peak matmuls and training steps are timed in turns (A, B, A, B, ...) so that load from other
processes on a shared machine falls on both alike; MFU = counted FLOPs / median step time / median peak.

FLOP counting (matmuls only; norms, activations, softmax, the optimizer and casts are not counted), with
N = B*T text tokens, M = B*65 media tokens, K = B*labelled positions:

* frozen decoder linears (q, k, v, o, gate, up, down; P parameters per layer): 2*P*N forward, and
  2*P*N backward for the input gradient (the frozen layers at and after the first block lie between the
  loss and trainable parameters; they need no weight gradient). Layers before the first block: forward only.
* self-attention scores and values: 4*B*H*T^2*hd forward, counted dense (as PaLM's MFU does), and twice
  that backward (dQ, dK, dV) where the layer needs an input gradient.
* output head: the loss computes logits for the K labelled positions only: 2*dim*V*K forward + 2*dim*V*K
  for the input gradient.
* trainable block linears on text (q, o, gate, up, down): 6*P*N (forward, input and weight gradients);
  block K/V projections on media: 6*P*M; media projection: 4*P*M (no input gradient: features are inputs).
* cross-attention scores and values: 4*B*H*T*L*hd forward (L = 65 media tokens per row), 8*B*H*T*L*hd backward.

GPU mode (``--gpu``, never run in CI): bf16 autocast (fp32 master weights, as Lightning's ``bf16-mixed``),
SDPA, a Llama 3.2 1B-shaped backbone (``LlamaConfig.from_name("llama3.2-1b")``, random weights) with blocks
before every 4th layer reading 256 media tokens x 6400 (ViT-H/14 at 224 px, five layers, as
recipes/image/llama3_vit_h.yaml), B=16 x T=512, loss on the last 256 positions. MFU is given against the
device's dense bf16 peak from a table of known devices (``--peak-tflops`` overrides) and against a measured
8192^3 bf16 matmul; then greedy generation with one image (bf16 weights, 128 new tokens) in tokens/s.
``--shape tiny`` runs the same path at a tiny shape (on CPU when there is no GPU) for testing.
"""

import argparse
import re
import time
from dataclasses import dataclass

import torch
from harness import interleaved, median, spread, top_ops

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched as a whole word
# of the device name, longest first.
KNOWN_PEAKS_TFLOPS = {
    "H200": 989.0, "GH200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "H20": 148.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
    "L4": 121.0, "A10": 125.0,
}


@dataclass
class Shape:
    preset: str
    batch: int
    seq: int
    labelled: int
    image_at: int
    media_tokens: int
    media_dim: int
    every: int = 4


SHAPES = {
    "smollm2": Shape("smollm2-135m", batch=16, seq=40, labelled=12, image_at=3, media_tokens=65, media_dim=768),
    "llama3.2-1b": Shape("llama3.2-1b", batch=16, seq=512, labelled=256, image_at=3, media_tokens=256, media_dim=6400),
    "tiny": Shape("tiny", batch=4, seq=32, labelled=8, image_at=3, media_tokens=17, media_dim=32),
}


# ------------------------------------------------------------------------------------------ counting
def count_flops(config, xconfig, s: Shape) -> dict[str, float]:
    """Matmul FLOPs of one training step, by component (see the module docstring)."""
    B, T, N, M, K = s.batch, s.seq, s.batch * s.seq, s.batch * s.media_tokens, s.batch * s.labelled
    d, hd, H, KV, V = config.dim, config.head_dim, config.n_heads, config.n_kv_heads, config.vocab_size
    first = min(xconfig.layers)
    with_grad = config.n_layers - first  # frozen layers that need input gradients
    p_layer = d * hd * (2 * H + 2 * KV) + 3 * d * config.intermediate_size
    attn = 4 * B * H * T * T * hd
    xd, xhd, xH, xKV, L = xconfig.dim, xconfig.head_dim, xconfig.n_heads, xconfig.n_kv_heads, s.media_tokens
    n_blocks = len(xconfig.layers)
    p_text = xd * xhd * 2 * xH + 3 * xd * xconfig.mlp_hidden  # q, o, gate, up, down
    p_media = xd * xhd * 2 * xKV  # k, v over media
    xattn = 4 * B * xH * T * L * xhd
    return {
        "frozen linears fwd": 2 * p_layer * N * config.n_layers,
        "frozen linears bwd (input grad)": 2 * p_layer * N * with_grad,
        "self-attention fwd+bwd": attn * config.n_layers + 2 * attn * with_grad,
        "output head (labelled positions)": 4 * d * V * K,
        "trainable block linears": n_blocks * (6 * p_text * N + 6 * p_media * M),
        "media projection": 4 * xconfig.media_dim * xd * M,
        "cross-attention fwd+bwd": n_blocks * 3 * xattn,
    }


# ------------------------------------------------------------------------------------------ model
def build(s: Shape, *, device: torch.device, std: float = 0.02):
    from sensorium import ComposedModel
    from sensorium.adapters import CrossAttentionAdapter, CrossAttentionConfig
    from sensorium.backbone import Llama, LlamaConfig

    config = LlamaConfig.from_name(s.preset)
    torch.manual_seed(0)
    with torch.device(device):
        backbone = Llama(config)
        xconfig = CrossAttentionConfig.for_backbone(config, s.media_dim, every=s.every)
        adapter = CrossAttentionAdapter(xconfig, modality="image")
    with torch.no_grad():
        for module in (backbone, adapter):
            for name, p in module.named_parameters():
                if name.endswith("gate"):
                    p.fill_(0.5)
                elif p.ndim >= 2:
                    p.normal_(0.0, std)
    return ComposedModel(backbone, [adapter]), config, xconfig


def make_batch(model, config, s: Shape, device: torch.device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (s.batch, s.seq), generator=g)
    tokens[:, s.image_at] = model.placeholder_ids["image"]
    labels = torch.full_like(tokens, -100)
    labels[:, -s.labelled :] = tokens[:, -s.labelled :]
    feats = torch.randn(s.batch, s.media_tokens, s.media_dim, generator=g)  # (B, L, D)
    media = {"image": {"features": feats.to(device), "counts": torch.ones(s.batch, dtype=torch.long, device=device)}}
    return tokens.to(device), labels.to(device), media


def train_step_fn(model, tokens, labels, media, *, autocast: bool, device: torch.device, sync):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens, media=media, labels=labels)
        loss.backward()
        opt.step()
        sync()

    return step


def matmul_fn(n: int, dtype: torch.dtype, device: torch.device, sync):
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def mm() -> None:
        torch.mm(a, b)
        sync()

    return mm, 2.0 * n**3


def report_flops(flops: dict[str, float]) -> float:
    total = sum(flops.values())
    for k, v in flops.items():
        print(f"  {k:34s} {v / 1e9:10.2f} GFLOP ({v / total:5.1%})")
    print(f"  {'total':34s} {total / 1e9:10.2f} GFLOP")
    return total


# ------------------------------------------------------------------------------------------ modes
def cpu_mode(args: argparse.Namespace) -> None:
    device, sync = torch.device("cpu"), (lambda: None)
    s = SHAPES[args.shape or "smollm2"]
    s = Shape(**{**s.__dict__, **{k: v for k, v in (("batch", args.batch), ("seq", args.seq),
                                                    ("labelled", args.labelled)) if v is not None}})
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, config, xconfig = build(s, device=device)
    tokens, labels, media = make_batch(model, config, s, device)
    step = train_step_fn(model, tokens, labels, media, autocast=args.bf16, device=device, sync=sync)
    mm, mm_flops = matmul_fn(args.matmul_size, dtype, device, sync)
    print(f"torch {torch.__version__}, {args.threads} threads, {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"{s.preset}: B={s.batch} T={s.seq}, {s.labelled} labelled, media {s.media_tokens} x {s.media_dim}, "
          f"blocks at {xconfig.layers}")
    total = report_flops(count_flops(config, xconfig, s))
    times = interleaved({"matmul": mm, "step": step}, args.repeats)
    peak, t_step = mm_flops / median(times["matmul"]), median(times["step"])
    achieved = total / t_step
    print(f"matmul {args.matmul_size}^3 times (s): {spread(times['matmul'])}; step times (s): {spread(times['step'])}")
    if args.profile:
        print(f"\n--- profile: one training step ---\n{top_ops(step, rows=15)}")
    kind = "bf16" if args.bf16 else "fp32"
    print(f"\n| measure | value |\n|---|---|\n| {kind} matmul peak ({args.matmul_size}^3, median) | "
          f"{peak / 1e12:.3f} TFLOP/s |\n| training step (median) | {t_step * 1e3:,.0f} ms |\n"
          f"| achieved | {achieved / 1e12:.3f} TFLOP/s |\n| MFU (achieved / measured peak) | {achieved / peak:.1%} |")


def gpu_peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(KNOWN_PEAKS_TFLOPS, key=len, reverse=True):  # the most specific name first
            if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", name.lower()):  # A10 is not A10G
                return KNOWN_PEAKS_TFLOPS[key], f"table entry {key!r} for {name!r}"
        return None, f"{name!r} is not in the table (pass --peak-tflops)"
    return None, "no GPU"


def gpu_mode(args: argparse.Namespace) -> None:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    s = SHAPES[args.shape or "llama3.2-1b"]
    model, config, xconfig = build(s, device=device)
    tokens, labels, media = make_batch(model, config, s, device)
    step = train_step_fn(model, tokens, labels, media, autocast=True, device=device, sync=sync)
    mm, mm_flops = matmul_fn(args.gpu_matmul_size if on_gpu else 1024, torch.bfloat16, device, sync)
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"torch {torch.__version__}, {name}, bf16 autocast, SDPA; {s.preset}: B={s.batch} T={s.seq}, "
          f"{s.labelled} labelled, media {s.media_tokens} x {s.media_dim}, blocks at {xconfig.layers}")
    total = report_flops(count_flops(config, xconfig, s))
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    t_step = (time.perf_counter() - t0) / args.steps
    mm()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        mm()
    measured = mm_flops / ((time.perf_counter() - t0) / args.steps)
    achieved = total / t_step
    peak, source = gpu_peak_tflops(args, device)
    rows = [f"| training step (mean of {args.steps}) | {t_step * 1e3:,.1f} ms |",
            f"| achieved | {achieved / 1e12:.2f} TFLOP/s |",
            f"| measured bf16 matmul | {measured / 1e12:.1f} TFLOP/s |",
            f"| MFU vs measured matmul | {achieved / measured:.1%} |"]
    if peak is not None:
        rows.append(f"| MFU vs {peak:g} TFLOP/s ({source}) | {achieved / (peak * 1e12):.1%} |")
    else:
        rows.append(f"| MFU vs table peak | n/a: {source} |")
    if on_gpu:
        rows.append(f"| peak GPU memory | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB |")
    rows.append(generation_row(model, config, s, media, args, device, sync))
    print("\n| measure | value |\n|---|---|\n" + "\n".join(rows))


def generation_row(model, config, s: Shape, media, args: argparse.Namespace, device: torch.device, sync) -> str:
    """Greedy generation with one image (bf16 weights, EOS ignored): tokens/s over ``--new-tokens``."""
    model = model.to(torch.bfloat16).eval()
    model.backbone.model.rotary_emb.reset()  # the rotary frequencies stay float32
    one = {"image": {"features": media["image"]["features"][:1].to(torch.bfloat16),
                     "counts": torch.ones(1, dtype=torch.long, device=device)}}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=g).tolist()
    prompt[0] = model.placeholder_ids["image"]
    N = args.new_tokens

    def run() -> list[int]:
        out = model.generate_ids([prompt], one, max_new_tokens=N, stop_ids=[])[0]
        sync()
        return out

    assert len(run()) == N, "generation stopped early"
    times = interleaved({"gen": run}, args.gen_repeats)["gen"]
    return (f"| greedy generation, 1 image, {args.prompt_len}-token prompt, {N} new tokens (bf16, median of "
            f"{args.gen_repeats}) | {N / median(times):,.1f} tok/s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="GPU mode: 1B backbone, bf16 autocast (see above)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: smollm2 (CPU), llama3.2-1b (--gpu)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--labelled", type=int)
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed rounds of (matmul, step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true", help="CPU: bf16 autocast step against a bf16 matmul peak")
    parser.add_argument("--profile", action="store_true", help="CPU: torch.profiler top ops of one step")
    parser.add_argument("--peak-tflops", type=float, help="GPU: dense bf16 peak to report MFU against")
    parser.add_argument("--gpu-matmul-size", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gen-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.gpu:
        if any(v is not None for v in (args.batch, args.seq, args.labelled)):
            parser.error("--batch/--seq/--labelled apply to the CPU mode only")
        gpu_mode(args)
    else:
        cpu_mode(args)


if __name__ == "__main__":
    main()
