"""The decoder's structure and its contracts for adapters."""

import pytest
import torch
from torch import nn

from sensorium.backbone import Llama, LlamaConfig
from sensorium.backbone.config import PRESETS


def test_presets_have_their_published_sizes():
    approx = {"smollm2-135m": 134.5e6, "llama3.2-1b": 1.236e9, "llama3.1-8b": 8.03e9, "llama2-7b": 6.74e9}
    for name, n in approx.items():
        assert abs(PRESETS[name].num_params() - n) / n < 0.01, name
    with pytest.raises(KeyError, match="unknown preset"):
        LlamaConfig.from_name("gpt-5")
    assert LlamaConfig.from_name("tiny", n_layers=2).n_layers == 2


def test_layers_and_embedding_are_exposed():
    model = Llama(LlamaConfig.from_name("tiny"))
    assert isinstance(model.layers, nn.ModuleList) and len(model.layers) == 4
    assert model.embed_tokens is model.model.embed_tokens
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_embeds_input_equals_token_input():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).eval()
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(embeds=model.embed_tokens(tokens)), model(tokens))
        hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 9, 64)


def test_placeholder_ids_are_refused_by_the_bare_backbone():
    model = Llama(LlamaConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 512]]))


def test_padding_rows_give_finite_outputs():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).eval()
    tokens = torch.randint(0, 512, (2, 6))
    pad = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    with torch.no_grad():
        out = model(tokens, pad_mask=pad)
        alone = model(tokens[:1, 2:])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1, 2:], alone, atol=1e-5, rtol=0)
