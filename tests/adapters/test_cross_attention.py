"""Gated cross-attention: identity at init, zero rows without media, Flamingo masking, gradient isolation."""

import pytest
import torch

from sensorium.adapters import FusedLayer
from sensorium.adapters.cross_attention import MediaInputs
from tests.tiny import compose_tiny, randomise


def _batch(model, *, counts=(1, 0), T=10, at=2):
    ph = model.placeholder_ids["image"]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 500, (len(counts), T), generator=g)
    for b, n in enumerate(counts):
        for k in range(n):
            tokens[b, at + 3 * k] = ph
    pixels = torch.randn(sum(counts), 3, 32, 32, generator=g)
    return tokens, {"image": {"inputs": pixels, "counts": torch.tensor(counts)}}


def test_untrained_adapter_equals_backbone_exactly(parts):
    bb, enc, xattn, _ = parts
    model = compose_tiny(bb, enc, xattn)
    tokens, media = _batch(model, counts=(1, 2))
    with torch.no_grad():
        state = model.prepare(tokens, media)
        composed = model(tokens, media=media)
        bare = bb(embeds=model.embed(tokens, state))  # same input sequence through the bare backbone
    assert torch.equal(composed, bare)


def test_text_only_rows_are_untouched_by_a_trained_adapter(parts):
    bb, enc, xattn, _ = parts
    model = compose_tiny(bb, enc, randomise(xattn))
    tokens, media = _batch(model, counts=(1, 0), at=4)
    with torch.no_grad():
        composed = model(tokens, media=media)
        # the same batch through the bare backbone (one batch shape, so the kernels sum in the same order)
        bare = bb(embeds=model.embed(tokens, model.prepare(tokens, media)))
    assert torch.isfinite(composed).all()
    assert torch.equal(composed[1:], bare[1:])  # row without media: exactly the backbone
    # in the row with media, positions before its placeholder see nothing; the rest does
    assert torch.equal(composed[0, :4], bare[0, :4])
    assert not torch.allclose(composed[0, 4:], bare[0, 4:])


def test_block_gives_exact_zero_for_rows_without_media():
    from sensorium.adapters import CrossAttentionAdapter, CrossAttentionConfig
    from sensorium.backbone.model import DecoderContext

    cfg = CrossAttentionConfig(dim=16, media_dim=8, n_heads=4, n_kv_heads=2, head_dim=4, mlp_hidden=24, layers=[0])
    adapter = randomise(CrossAttentionAdapter(cfg))
    block = adapter.blocks[0]
    x = torch.randn(2, 5, 16)
    media = adapter.prepare(torch.randn(2, 1, 3, 8), torch.tensor([[True], [False]]), torch.tensor([[2], [0]]))
    ctx = DecoderContext(cos=torch.ones(1), sin=torch.zeros(1), mask=None, is_causal=True)
    out = block(x, media, ctx)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], x[1])  # invalid item: no media at all
    assert torch.equal(out[0, :2], x[0, :2])  # before the placeholder slot
    assert not torch.equal(out[0, 2:], x[0, 2:])


def test_flamingo_visibility_rules():
    values = torch.randn(1, 4, 8)
    valid = torch.ones(1, 4, dtype=torch.bool)
    slot = torch.tensor([[1, 1, 3, 3]])  # two items of two tokens, placeholders at slots 1 and 3
    prev = MediaInputs(values, valid, slot, "previous").mask(0, 5)
    last = MediaInputs(values, valid, slot, "last").mask(0, 5)
    assert prev[1][0, :, 0].tolist() == [False, True, True, True, True]
    assert prev[0][0, 0, 4].tolist() == [True, True, True, True]
    assert last[0][0, 0, 4].tolist() == [False, False, True, True]
    assert last[0][0, 0, 2].tolist() == [True, True, False, False]


def test_gradients_reach_adapter_parameters_only(parts):
    bb, enc, xattn, _ = parts
    model = compose_tiny(bb, enc, xattn)
    with torch.no_grad():  # open the gates so every adapter parameter is on the gradient path
        for block in xattn.blocks:
            block.cross_attn_attn_gate.fill_(0.5)
            block.cross_attn_mlp_gate.fill_(0.5)
    tokens, media = _batch(model, counts=(1, 1))
    labels = tokens.masked_fill(tokens >= 512, -100)
    model(tokens, media=media, labels=labels).backward()
    for name, p in model.named_parameters():
        if name.startswith("adapters."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any(p.requires_grad for p in bb.parameters())
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training


def test_fusion_keeps_backbone_keys_and_detaches_cleanly(parts):
    bb, enc, xattn, _ = parts
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = compose_tiny(bb, enc, xattn)
    assert isinstance(bb.layers[0], FusedLayer) and not isinstance(bb.layers[1], FusedLayer)
    after = bb.state_dict()
    assert list(after) == list(before)
    bb.load_state_dict(before)  # loading through the wrapper works with the original keys
    model.remove_adapter("image")
    assert not any(isinstance(layer, FusedLayer) for layer in bb.layers)
    assert list(bb.state_dict()) == list(before)


def test_placeholder_count_mismatch_is_a_clear_error(parts):
    from sensorium.compose import MediaMismatchError

    bb, enc, xattn, _ = parts
    model = compose_tiny(bb, enc, xattn)
    tokens, media = _batch(model, counts=(1, 0))
    media["image"]["counts"] = torch.tensor([2, 0])
    media["image"]["inputs"] = torch.randn(2, 3, 32, 32)
    with pytest.raises(MediaMismatchError, match="sample 0: 1 <\\|image\\|> positions in the text, but 2"):
        model(tokens, media=media)
