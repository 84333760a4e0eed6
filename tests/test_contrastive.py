"""Contrastive decoding (CM3Leon-style classifier-free guidance): next-token scores
``(1 + α) · logits_with_media − α · logits_without_media``, the second half batched with the first.

α = 0 is plain decoding; the batched, cached run equals a step-by-step reference that scores each prompt
with and without its media separately; and a constructed backbone whose text prior outweighs a small
media effect shows plain decoding answer from the prior while guidance answers from the image.
"""

import dataclasses
import math

import pytest
import torch
from torch import nn

from sensorium.adapters.cross_attention import CrossAttentionAdapter, CrossAttentionConfig
from sensorium.backbone import Llama, LlamaConfig, generate
from sensorium.backbone.generate import contrast_logits
from sensorium.compose import ComposedModel, MediaMismatchError
from sensorium.encoders.base import Features
from tests.test_compose import WORDS, word_tokenizer
from tests.tiny import randomise

PROMPT_TEXT = [[1, 3, 7, 8], [5, 9, 10], [1, 4, 6, 11, 12, 13]]


@pytest.fixture
def model(parts):
    bb, enc, xattn, _ = parts
    return ComposedModel(bb, [randomise(xattn)], encoders={"image": enc}, tokenizer=word_tokenizer())


def _batch(model, counts=(1, 2, 0)):
    """Prompts with ``counts[b]`` images each (placeholders after the second token) and their images, encoded
    once (``features``: the reference below runs many forwards)."""
    ph = model.placeholder_ids["image"]
    prompts = [p[:2] + [ph] * n + p[2:] for p, n in zip(PROMPT_TEXT, counts, strict=True)]
    images = torch.randn(sum(counts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.encode("image", {"inputs": images}).values  # (I, N, D)
    return prompts, {"image": {"features": features, "counts": list(counts)}}


def _rows_per_forward(model) -> tuple[list[int], object]:
    rows: list[int] = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["embeds"].shape[0]),
                                                    with_kwargs=True)
    return rows, hook


def test_alpha_zero_is_plain_decoding_token_for_token(model):
    prompts, media = _batch(model)
    rows, hook = _rows_per_forward(model)
    plain = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[])
    zero = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[], contrastive_alpha=0.0)
    hook.remove()
    assert zero == plain and all(len(r) == 8 for r in plain)
    assert set(rows) == {3}  # α = 0 never runs the contrast half
    for b in range(3):  # and each prompt alone decodes the same as in the batch
        one = {"image": {"features": media["image"]["features"][sum(media["image"]["counts"][:b]) :][
            : media["image"]["counts"][b]], "counts": [media["image"]["counts"][b]]}}
        assert model.generate_ids([prompts[b]], one, max_new_tokens=8, stop_ids=[], contrastive_alpha=0) == [plain[b]]
    chat = [{"role": "user", "content": [{"type": "image", "image": torch.rand(3, 40, 40)},
                                         {"type": "text", "text": " what is this ?"}]}]
    assert model.generate(chat, max_new_tokens=6, contrastive_alpha=0.0) == model.generate(chat, max_new_tokens=6)


def _reference(model, prompt, features, alpha, steps):
    """Greedy guided decoding one prompt at a time, every step recomputed without a cache."""
    ph = set(model.placeholder_ids.values())
    with_media, without = list(prompt), [t for t in prompt if t not in ph]
    media = {"image": {"features": features, "counts": [len(features)]}} if len(features) else None
    out = []
    for _ in range(steps):
        lw = model(torch.tensor([with_media]), media=media)[0, -1]
        lwo = model(torch.tensor([without]))[0, -1]
        nxt = int(((1 + alpha) * lw - alpha * lwo).argmax())
        out.append(nxt)
        with_media.append(nxt)
        without.append(nxt)
    return out


def test_batched_contrast_equals_a_step_by_step_reference_in_one_forward_of_2b_rows_per_step(model):
    prompts, media = _batch(model)
    rows, hook = _rows_per_forward(model)
    got = model.generate_ids(prompts, media, max_new_tokens=6, stop_ids=[], contrastive_alpha=1.5)
    hook.remove()
    assert rows == [6] * 6  # one forward of 2B rows per step (media K/V computed once, in prepare)
    splits = torch.split(media["image"]["features"], media["image"]["counts"])
    with torch.no_grad():
        expected = [_reference(model, p, imgs, 1.5, 6) for p, imgs in zip(prompts, splits, strict=True)]
    assert got == expected
    assert got[2] == model.generate_ids(prompts[2:], None, max_new_tokens=6, stop_ids=[])[0]  # no media: plain


def test_alpha_changes_the_answer_when_media_matter_and_not_without_media(model):
    prompts, media = _batch(model, counts=(1, 1, 1))
    plain = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[])
    guided = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[], contrastive_alpha=3.0)
    assert guided != plain
    text = [p[:2] + p[3:] for p in prompts]
    rows, hook = _rows_per_forward(model)
    assert model.generate_ids(text, None, max_new_tokens=8, stop_ids=[], contrastive_alpha=3.0) == \
        model.generate_ids(text, None, max_new_tokens=8, stop_ids=[])
    hook.remove()
    assert set(rows) == {3}  # nothing to contrast: plain decoding, no second half


def test_bad_alpha_and_media_only_prompts_are_refused(model):
    prompts, media = _batch(model, counts=(1, 0, 0))
    with pytest.raises(ValueError, match="contrastive_alpha must be a finite number >= 0"):
        model.generate_ids(prompts, media, max_new_tokens=2, contrastive_alpha=-1.0)
    ph = model.placeholder_ids["image"]
    with pytest.raises(MediaMismatchError, match="prompt 0 holds only media"):
        model.generate_ids([[ph]], {"image": {"features": media["image"]["features"], "counts": [1]}}, max_new_tokens=2,
                           contrastive_alpha=1.0)


def test_contrast_logits_formula():
    w, wo = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[2.5, 0.0, 0.0]])
    torch.testing.assert_close(contrast_logits(w, wo, 2.0), 3 * w - 2 * wo)
    assert torch.equal(contrast_logits(w, w, 7.0), w)  # agreeing rows are kept exactly


def test_backbone_generate_takes_contrast_prompts(parts):
    """The generic decoder: classifier-free guidance against any contrast prompt (here a shorter context)."""
    bb = parts[0]
    prompts, contrast = [[5, 17, 99, 3], [42, 8]], [[3], [8]]
    assert generate(bb, prompts, max_new_tokens=5, contrastive_alpha=0.0, contrastive_prompts=contrast) == \
        generate(bb, prompts, max_new_tokens=5)
    guided = generate(bb, prompts, max_new_tokens=5, contrastive_alpha=2.0, contrastive_prompts=contrast)
    for p, c, g in zip(prompts, contrast, guided, strict=True):
        with torch.no_grad():
            ref = []
            for _ in range(5):
                lw, lwo = bb(torch.tensor([p + ref]))[0, -1], bb(torch.tensor([c + ref]))[0, -1]
                ref.append(int((3 * lw - 2 * lwo).argmax()))
        assert g == ref


# ------------------------------------------------------------------ a constructed grounding case
PRIOR, RED, BLUE = WORDS.index("a"), WORDS.index("red"), WORDS.index("blue")
COLOURS = {"red": torch.tensor([1.0, 0.0, 0.0, 0.0]), "blue": torch.tensor([0.0, 1.0, 0.0, 0.0])}


class ColourEncoder(nn.Module):
    """A 'frozen encoder' whose feature is the given colour code itself: one token of width 4 per image."""

    out_dim = 4

    def preprocess(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def forward(self, x: torch.Tensor) -> Features:
        return Features(x[:, None, :], torch.ones(x.shape[0], 1, dtype=torch.bool))  # (I, 1, 4)


def grounding_model() -> ComposedModel:
    """Every decoder layer is the identity (``o_proj`` and ``down_proj`` zero) and every token embeds as
    ``e0``; the untied head scores ``a`` with ``10·h0`` and ``red``/``blue`` with ``20·h1``/``20·h2``. The image
    adapter adds ``tanh(g)·e1 = 0.2·e1`` for a red image (``0.2·e2`` for blue) at every position after it.

    Last hidden state after the final RMSNorm (width 64): with the image ``h ≈ 8·(e0 + 0.2·e1)/√1.04``,
    so ``a`` scores 78.4 and ``red`` 31.4 (plain greedy: ``a``, the text prior); without it ``h ≈ 8·e0``:
    ``a`` 80.0, ``red`` 0. Guided: ``a`` 78.4 − 1.6·α, ``red`` 31.4·(1 + α): ``a`` up to α ≈ 1.43, then ``red``.
    """
    cfg = dataclasses.replace(LlamaConfig.from_name("tiny"), tie_word_embeddings=False)
    torch.manual_seed(0)
    bb = Llama(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in bb.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        bb.embed_tokens.weight.zero_()
        bb.embed_tokens.weight[:, 0] = 1.0
        bb.lm_head.weight.zero_()
        bb.lm_head.weight[PRIOR, 0] = 10.0
        bb.lm_head.weight[RED, 1] = 20.0
        bb.lm_head.weight[BLUE, 2] = 20.0
    adapter = CrossAttentionAdapter(CrossAttentionConfig(dim=64, media_dim=4, n_heads=4, n_kv_heads=2, head_dim=16,
                                                         mlp_hidden=8, layers=[0], media_norm=False))
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()  # keys 0: each image's one token gets all the attention of the positions that see it
        adapter.media_proj.weight[1, 0] = 1.0  # red code → e1, blue code → e2
        adapter.media_proj.weight[2, 1] = 1.0
        block = adapter.blocks[0]
        block.cross_attn.v_proj.weight[0, 1] = 1.0  # KV head 0 (query heads 0, 1) carries e1, e2
        block.cross_attn.v_proj.weight[1, 2] = 1.0
        block.cross_attn.o_proj.weight[1, 0] = 1.0  # query head 0 writes them back to e1, e2
        block.cross_attn.o_proj.weight[2, 1] = 1.0
        block.cross_attn_attn_gate.fill_(math.atanh(0.2))  # a small media effect; the MLP gate stays 0
    return ComposedModel(bb, [adapter], encoders={"image": ColourEncoder()}, tokenizer=word_tokenizer())


@pytest.mark.parametrize("colour, token", [("red", RED), ("blue", BLUE)])
def test_guidance_turns_a_prior_answer_into_a_grounded_one(colour, token):
    model = grounding_model()
    ph = model.placeholder_ids["image"]
    prompt = [WORDS.index(w) for w in ("user", "what", "is")] + [ph] + [WORDS.index(w) for w in ("this", "?")]
    media = {"image": {"inputs": COLOURS[colour][None], "counts": [1]}}

    def run(alpha: float) -> list[int]:
        return model.generate_ids([prompt], media, max_new_tokens=3, stop_ids=[], contrastive_alpha=alpha)[0]

    assert run(0.0) == [PRIOR] * 3  # plain greedy decoding ignores the image
    assert run(1.0) == [PRIOR] * 3  # too weak a contrast (threshold α ≈ 1.43)
    assert run(3.0) == [token] * 3  # grounded: the image's colour
    chat = [{"role": "user", "content": [{"type": "image", "image": COLOURS[colour]},
                                         {"type": "text", "text": "what is this ?"}]}]
    assert model.generate(chat, max_new_tokens=3, system="", contrastive_alpha=3.0).split() == [colour] * 3
    assert model.generate(chat, max_new_tokens=3, system="").split() == ["a"] * 3
