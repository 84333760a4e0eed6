"""Image-adapter training step and greedy generation with one image: sensorium against transformers' Mllama.

Run:  python bench/image_adapter.py [--shape smollm2|tiny] [--batch 8] [--seq 64] [--repeats 5]
                                    [--new-tokens 128] [--autocast] [--checkpointing] [--profile] [--threads 2]
                                    [--skip-training] [--skip-memory] [--skip-generation]

Both sides hold the same random weights: a sensorium backbone (SmolLM2-135M's shape: dim 576, 30 layers,
9 heads, 3 KV heads, SwiGLU 1536, vocab 49152) with a gated cross-attention adapter in front of every 4th
layer (media 65 tokens x 768, the embedded default image encoder's output), written with ``export_mllama``
as a ``MllamaForConditionalGeneration`` folder (38 text layers, 8 of them cross-attention) and loaded with
transformers (``attn_implementation="sdpa"``). The Mllama folder gets a one-layer vision tower whose output
is 65 tokens x 768 (image 112 px, patch 14, one tile), so its cross-attention mask has the adapter's shape.

(a) Training step: fwd + bwd + AdamW over B rows of T tokens, the image placeholder first (every text
    position sees the image, where Mllama and sensorium agree exactly), loss on the second half of each row
    (a prompt/answer split as in chat training). Vision features are given precomputed on both sides, so
    the vision tower's cost is excluded: sensorium gets ``media={"image": {"features": ...}}``; Mllama gets
    ``cross_attention_states = multi_modal_projector(features)`` (transformers skips its projector when
    ``cross_attention_states`` is passed, so the bench applies it, which keeps it trainable and timed) and the
    processor's ``cross_attention_mask``. Frozen: the LM and the vision tower (``requires_grad_(False)``);
    trained: the cross-attention layers and the projector on Mllama, the adapter's blocks and projection on
    sensorium. The adapter's ``placeholder_embedding`` is frozen here: on Mllama it is a row of the frozen
    embedding. The script asserts equal trainable parameter counts and equal losses before timing.
    Peak memory: each side runs in its own subprocess; after building the model and the batch and paging in
    every weight (transformers maps safetensors files lazily, so untouched weights are not yet resident),
    the resident-memory high-water mark is reset (``/proc/self/clear_refs``), three steps run, and the peak
    above that baseline is reported (activations, gradients, AdamW state, allocator slack; see
    ``harness.PeakRSS``).
(b) Greedy generation: one prompt (the image, then text), N new tokens, EOS ignored (the exported config has
    no EOS in the vocabulary). Mllama runs ``generate`` with ``pixel_values`` (its one-layer vision tower runs
    once at prefill; its time is printed) and sensorium gets that tower's output as features, as
    tests/test_mllama.py does. The script reports how many leading tokens agree.

Timings interleave the two sides (A, B, A, B, ...) and report medians, so that load from other processes
falls on both alike. The ratio is transformers time / sensorium time (> 1: sensorium is faster).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from harness import PeakRSS, interleaved, median, spread, top_ops

SHAPES = {
    # text preset, vision tower: (image_size, patch_size, hidden) → (image/patch)^2 + 1 tokens of 2 * hidden
    "smollm2": ("smollm2-135m", (112, 14, 384)),
    "tiny": ("tiny", (56, 14, 16)),
}


# ------------------------------------------------------------------------------------------ models
def build_sensorium(shape: str, seed: int = 0):
    """The random backbone and adapter of ``shape`` (the same weights for the same seed)."""
    from sensorium.adapters import CrossAttentionAdapter, CrossAttentionConfig
    from sensorium.backbone import Llama, LlamaConfig

    preset, (size, patch, hidden) = SHAPES[shape]
    config = LlamaConfig.from_name(preset, eos_token_ids=(), bos_token_id=None)
    media_dim = 2 * hidden  # Mllama's vision output: final + one intermediate layer, concatenated
    torch.manual_seed(seed)
    backbone = Llama(config)
    xconfig = CrossAttentionConfig.for_backbone(config, media_dim, every=4, media_norm=False, attend="last")
    adapter = CrossAttentionAdapter(xconfig, modality="image")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (backbone, adapter):
            for name, p in module.named_parameters():
                if name.endswith("gate"):
                    p.fill_(0.5)  # mid-training gates: the blocks change the output
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return backbone.requires_grad_(False).eval(), adapter


def media_tokens(shape: str) -> int:
    size, patch, _ = SHAPES[shape][1]
    return (size // patch) ** 2 + 1


def write_vision_tower(folder: Path, shape: str) -> Path:
    """A Mllama folder whose one-layer vision tower outputs ``media_tokens(shape)`` x ``2 * hidden`` per image."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    size, patch, hidden = SHAPES[shape][1]
    vision = dict(hidden_size=hidden, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                  intermediate_size=2 * hidden, vision_output_dim=2 * hidden, image_size=size, patch_size=patch,
                  max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    text = dict(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=16, cross_attention_layers=[0], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    return folder


def export(folder: Path, shape: str) -> Path:
    """Write the sensorium model of ``shape`` as a Mllama folder (with a small vision tower); return it."""
    from sensorium.interop import export_mllama

    backbone, adapter = build_sensorium(shape)
    vision = write_vision_tower(folder / "vision", shape)
    return export_mllama(backbone, adapter, folder / "mllama", vision=vision)


def load_mllama(folder: Path):
    from transformers import MllamaForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # EOS ignored, as on the sensorium side
    return model


def trainable_sensorium(shape: str, checkpointing: bool = False):
    from sensorium import ComposedModel

    backbone, adapter = build_sensorium(shape)
    adapter.placeholder_embedding.requires_grad_(False)  # a row of Mllama's frozen embedding
    backbone.activation_checkpointing = checkpointing
    return ComposedModel(backbone, [adapter])


def trainable_mllama(folder: Path):
    model = load_mllama(folder).train()
    model.requires_grad_(False)
    text = model.model.language_model
    for i in model.config.text_config.cross_attention_layers:
        text.layers[i].requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(True)
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ training
def batch(shape: str, vocab: int, B: int, T: int, media_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random text (B, T), labels on the second half, one image's features (B, N, media_dim) per row."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (B, T), generator=g)
    labels = text.clone()
    labels[:, : T // 2] = -100  # image + prompt: no loss
    feats = torch.randn(B, media_tokens(shape), media_dim, generator=g)  # (B, N, D)
    return {"text": text, "labels": labels, "features": feats}


def optimizer_step(loss, opt: torch.optim.Optimizer):
    """One training step of ``loss``: zero the gradients, backward, ``opt.step()``; returns the loss value."""

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        opt.step()
        return value.item()

    return step


def sensorium_step_fn(model, data: dict[str, torch.Tensor], *, autocast: bool):
    tokens = data["text"].clone()
    tokens[:, 0] = model.placeholder_ids["image"]
    B = tokens.shape[0]
    media = {"image": {"features": data["features"], "counts": torch.ones(B, dtype=torch.long)}}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(tokens, media=media, labels=data["labels"])

    return loss, optimizer_step(loss, opt)


def mllama_step_fn(model, data: dict[str, torch.Tensor], *, autocast: bool):
    ids = data["text"].clone()
    ids[:, 0] = model.config.image_token_index
    B, T = ids.shape
    xmask = torch.ones(B, T, 1, 1, dtype=torch.long)  # (B, T, images, tiles): every position sees the image
    dim = model.config.text_config.hidden_size
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            states = model.model.multi_modal_projector(data["features"]).reshape(B, -1, dim)  # (B, N, dim)
            return model(input_ids=ids, cross_attention_states=states, cross_attention_mask=xmask,
                         labels=data["labels"], use_cache=False).loss

    return loss, optimizer_step(loss, opt)


def step_fns(side: str, shape: str, folder: Path, args: argparse.Namespace):
    """(model, loss fn, step fn) of one side, on the bench batch."""
    if side == "sensorium":
        model = trainable_sensorium(shape, args.checkpointing)
        vocab, media_dim = model.backbone.config.vocab_size, model.adapters["image"].config.media_dim
        make = sensorium_step_fn
    else:
        model = trainable_mllama(folder)
        vocab, media_dim = model.config.text_config.vocab_size, model.config.vision_config.vision_output_dim
        make = mllama_step_fn
    data = batch(shape, vocab, args.batch, args.seq, media_dim)
    loss, step = make(model, data, autocast=args.autocast)
    return model, loss, step


def memory_child(side: str, shape: str, folder: Path, args: argparse.Namespace) -> None:
    """Run in a subprocess: peak resident memory of three training steps above the built model + batch."""
    torch.set_num_threads(args.threads)
    model, _, step = step_fns(side, shape, folder, args)
    # transformers maps safetensors weights lazily: page every weight in first, so that the baseline holds the
    # whole model on both sides and the peak counts training memory only
    with torch.no_grad():
        touched = sum(float(t.sum()) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert touched == touched, "weights hold NaN"
    with PeakRSS() as m:
        for _ in range(3):
            step()
    print(json.dumps({"side": side, "delta_mib": m.delta_mib, "method": m.method, "model_mib": m.base_kib / 1024}))


def peak_memory(side: str, shape: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", side, "--folder", str(folder), "--shape", shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    if args.autocast:
        cmd.append("--autocast")
    if args.checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_label(args: argparse.Namespace) -> str:
    """How a table row's run was made: number format, and checkpointing on the sensorium side."""
    return ("bf16 autocast" if args.autocast else "fp32") + (", sensorium checkpointed" if args.checkpointing else "")


def bench_training(shape: str, folder: Path, args: argparse.Namespace) -> list[str]:
    ours, ours_loss, ours_step = step_fns("sensorium", shape, folder, args)
    hf, hf_loss, hf_step = step_fns("transformers", shape, folder, args)
    n_ours, n_hf = trainable_count(ours), trainable_count(hf)
    assert n_ours == n_hf, f"trainable parameters differ: sensorium {n_ours:,}, transformers {n_hf:,}"
    a, b = ours_loss().item(), hf_loss().item()
    tol = 2e-2 if args.autocast else 1e-4
    assert abs(a - b) <= tol * max(1.0, abs(b)), f"losses differ: sensorium {a}, transformers {b}"
    print(f"trainable parameters: {n_ours:,} on both sides; loss {a:.5f} (sensorium) vs {b:.5f} (transformers); "
          f"attention: {hf.config._attn_implementation}", flush=True)
    times = interleaved({"sensorium": ours_step, "transformers": hf_step}, args.repeats)
    t_ours, t_hf = median(times["sensorium"]), median(times["transformers"])
    print(f"step times (s): sensorium {spread(times['sensorium'])}, transformers {spread(times['transformers'])}")
    if args.profile:
        for name, fn in (("sensorium", ours_step), ("transformers", hf_step)):
            print(f"\n--- profile: {name} training step ---\n{top_ops(fn)}", flush=True)
    precision = run_label(args)
    return [f"| {shape} | training step B={args.batch} T={args.seq} ({precision}) | {t_ours * 1e3:,.0f} ms | "
            f"{t_hf * 1e3:,.0f} ms | {t_hf / t_ours:.2f}x |"]


def bench_memory(shape: str, folder: Path, args: argparse.Namespace) -> list[str]:
    mem = {side: peak_memory(side, shape, folder, args) for side in ("sensorium", "transformers")}
    m_ours, m_hf = mem["sensorium"]["delta_mib"], mem["transformers"]["delta_mib"]
    print(f"peak memory method: {mem['sensorium']['method']}; resident model: sensorium "
          f"{mem['sensorium']['model_mib']:,.0f} MiB, transformers {mem['transformers']['model_mib']:,.0f} MiB")
    precision = run_label(args)
    return [f"| {shape} | training peak memory above the built model ({precision}) | {m_ours:,.0f} MiB | "
            f"{m_hf:,.0f} MiB | {m_ours / m_hf:.2f}x of transformers' |"]


# ---------------------------------------------------------------------------------------- generation
def bench_generation(shape: str, folder: Path, args: argparse.Namespace) -> list[str]:
    from sensorium import ComposedModel
    from sensorium.interop import mllama_media

    backbone, adapter = build_sensorium(shape)
    ours = ComposedModel(backbone, [adapter]).eval()
    hf = load_mllama(folder).eval()
    vc = hf.config.vision_config
    g = torch.Generator().manual_seed(1)
    P, N = args.prompt_len, args.new_tokens
    text = torch.randint(0, backbone.config.vocab_size, (1, P), generator=g)
    pixels = torch.randn(1, 1, 1, 3, vc.image_size, vc.image_size, generator=g)  # (B, images, tiles, C, H, W)
    vision_inputs = dict(pixel_values=pixels, aspect_ratio_ids=torch.tensor([[1]]),
                         aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long))
    ids = text.clone()
    ids[:, 0] = hf.config.image_token_index
    hf_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                     cross_attention_mask=torch.ones(1, P, 1, 1, dtype=torch.long), **vision_inputs)
    with torch.inference_mode():
        vision = hf.model.vision_model(**vision_inputs).last_hidden_state  # (1, 1, 1, patches, D)
    media = {"image": mllama_media(vision, [1])}
    prompt = [ours.placeholder_ids["image"], *text[0, 1:].tolist()]

    def run_ours() -> list[int]:
        return ours.generate_ids([prompt], media, max_new_tokens=N, stop_ids=[])[0]

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(**hf_inputs, max_new_tokens=N, do_sample=False, pad_token_id=0)
        return out[0, P:].tolist()

    a, b = run_ours(), run_hf()
    assert len(a) == len(b) == N, f"expected {N} new tokens, got {len(a)} (sensorium) and {len(b)} (transformers)"
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), N)
    times = interleaved({"sensorium": run_ours, "transformers": run_hf}, args.repeats)
    t_ours, t_hf = median(times["sensorium"]), median(times["transformers"])
    t_vision = median(interleaved({"v": lambda: hf.model.vision_model(**vision_inputs)}, 5)["v"])
    print(f"generation times (s): sensorium {spread(times['sensorium'])}, transformers {spread(times['transformers'])}; "
          f"Mllama vision tower (inside transformers' time): {t_vision * 1e3:.1f} ms; "
          f"first {agree} of {N} tokens agree", flush=True)
    if args.profile:
        for name, fn in (("sensorium", run_ours), ("transformers", run_hf)):
            print(f"\n--- profile: {name} generation ---\n{top_ops(fn)}", flush=True)
    return [f"| {shape} | greedy generation, 1 image, {P}-token prompt, {N} new tokens (same tokens: {agree}/{N}) | "
            f"{N / t_ours:,.1f} tok/s | {N / t_hf:,.1f} tok/s | {t_hf / t_ours:.2f}x |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast for the training step (both sides)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="sensorium side with activation checkpointing (each decoder layer recomputed in the backward)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of each side")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-training", action="store_true", help="skip the step timing")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--memory-child", choices=["sensorium", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the training entry points do (both sides alike)
    if args.memory_child:
        memory_child(args.memory_child, args.shape, args.folder, args)
        return
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(Path(tmp), args.shape)
        if not args.skip_training:
            rows += bench_training(args.shape, folder, args)
        if not args.skip_memory:
            rows += bench_memory(args.shape, folder, args)
        print("\n".join(rows), flush=True)  # kept if the generation part is interrupted
        if not args.skip_generation:
            rows += bench_generation(args.shape, folder, args)
    print("\n| shape | measure | sensorium | transformers | ratio |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
