"""ComposedModel generation: multi-image chats, media K/V once, cache equals recomputation, splicing."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from sensorium.backbone.tokenizer import Tokenizer
from sensorium.compose import ComposedModel, MediaMismatchError
from tests.tiny import randomise

WORDS = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n", "what", "is", "this", "a",
         "red", "blue", "circle", "square", "?", "."] + [f"w{i}" for i in range(80)]


def word_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, eos_ids=[2], chat_format="chatml")


@pytest.fixture
def composed(parts):
    bb, enc, xattn, _ = parts
    return ComposedModel(bb, [randomise(xattn)], encoders={"image": enc}, tokenizer=word_tokenizer())


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_placeholders_move_past_the_backbone_vocabulary(composed):
    assert composed.tokenizer.placeholder_ids["<|image|>"] == 512 == composed.placeholder_ids["image"]


def test_multi_image_multi_turn_chat_generates(composed):
    a, b = _images(2)
    chat = [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": " what is this ?"}]},
        {"role": "assistant", "content": "a red circle ."},
        {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": " and this ?"}]},
    ]
    out = composed.generate(chat, max_new_tokens=6)
    assert isinstance(out, str)
    batch = composed.generate([chat, chat[:1]], max_new_tokens=6)
    assert batch[0] == out and len(batch) == 2
    assert batch[1] == composed.generate(chat[:1], max_new_tokens=6)


def test_media_kv_computed_once_per_generation(composed):
    calls = []
    for block in composed.adapters["image"].blocks:
        block.cross_attn.k_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    composed.generate([{"role": "user", "content": [{"type": "image", "image": _images(1)[0]}]}], max_new_tokens=8)
    assert len(calls) == len(composed.adapters["image"].blocks)


@pytest.mark.parametrize("kind", ["xattn", "proj"])
def test_cached_generation_equals_recomputation(parts, kind):
    bb, enc, xattn, proj = parts
    adapter = randomise(xattn if kind == "xattn" else proj)
    model = ComposedModel(bb, [adapter], encoders={"image": enc}, tokenizer=word_tokenizer())
    ph = model.placeholder_ids["image"]
    prompts = [[1, 3] + [ph] * adapter.tokens_per_item + [7, 8], [1, 9] + [ph] * adapter.tokens_per_item * 2]
    media = {"image": {"inputs": torch.randn(3, 3, 32, 32), "counts": [1, 2]}}
    cached = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[])
    full = model.generate_ids(prompts, media, max_new_tokens=8, stop_ids=[], use_cache=False)
    assert cached == full
    single = model.generate_ids(prompts[1:], {"image": {"inputs": media["image"]["inputs"][1:], "counts": [2]}},
                                max_new_tokens=8, stop_ids=[])
    assert single[0] == cached[1]


def test_media_without_adapter_is_refused(parts):
    bb, enc, _, _ = parts
    model = ComposedModel(bb, [], encoders={"image": enc})
    tokens = torch.tensor([[1, 512, 3]])
    with pytest.raises(MediaMismatchError, match="no image media was given"):
        model(tokens)
    with pytest.raises(MediaMismatchError, match="no image adapter"):
        model(tokens, media={"image": {"inputs": torch.randn(1, 3, 32, 32), "counts": [1]}})
