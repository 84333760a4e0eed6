"""One model from many adapters: image, video and speech adapter folders composed on one backbone.

Adapters are trained (here: randomised, gates open) one at a time on the same tiny backbone and saved with
their encoders; ``sensorium.compose`` puts them together without retraining. A modality whose media are
absent must leave the result exactly as its adapter alone would give it; each adapter sees its own media
only; a mixed conversation runs; an adapter for another backbone is refused by folder name.
"""

import contextlib
import dataclasses
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import sensorium
from sensorium.adapters import AdapterHashWarning, AdapterMismatchError, save_adapter
from sensorium.adapters.cross_attention import (
    CrossAttentionAdapter,
    CrossAttentionConfig,
    VideoCrossAttentionAdapter,
)
from sensorium.adapters.fusion import FusedLayer
from sensorium.adapters.perceiver import PerceiverConfig
from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from sensorium.backbone import Llama, LlamaConfig
from sensorium.compose import ComposedModel, MediaMismatchError
from sensorium.encoders import ImageEncoderSpec, VideoEncoder, VideoEncoderSpec
from sensorium.encoders.speech import SAMPLE_RATE, SpeechEncoder, SpeechEncoderSpec
from tests.test_compose import word_tokenizer
from tests.tiny import randomise, tiny_backbone, tiny_encoder

SPEECH = SpeechEncoderSpec(dim=32, num_layers=2, num_heads=4, ffn_dim=64, kernel_size=7)
MODALITIES = ("image", "video", "speech")


def _wave(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SAMPLE_RATE
    return (0.3 * torch.sin(2 * torch.pi * (200 + 70 * seed) * t) + 0.05 * torch.randn(n, generator=g)).float()


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def _frames(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, 255, (6, 40, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, object]:
    """Three adapter folders trained (randomised, non-zero gates) on the same tiny backbone, with encoders."""
    bb = tiny_backbone()
    image_enc = tiny_encoder()
    torch.manual_seed(1)
    video_enc = VideoEncoder(VideoEncoderSpec(image=ImageEncoderSpec(name="resnet10t", image_size=32), num_frames=4))
    torch.manual_seed(0)
    speech_enc = SpeechEncoder(SPEECH)
    image = CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, image_enc.out_dim, every=2))  # layers 0, 2
    video = VideoCrossAttentionAdapter(  # layer 0 shared with the image adapter, layer 3 its own
        CrossAttentionConfig.for_backbone(bb.config, 32, layers=[0, 3]),
        PerceiverConfig(media_dim=video_enc.out_dim, dim=32, num_latents=4, num_frames=4, group=2, depth=1, n_heads=4),
    )
    speech = SpeechAdapter(SpeechAdapterConfig.for_backbone(bb.config, SPEECH.dim, hidden=32, n_heads=4))
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (m, adapter, enc) in enumerate(
        (("image", image, image_enc), ("video", video, video_enc), ("speech", speech, speech_enc)), start=2
    ):
        out[m] = save_adapter(randomise(adapter, seed), root / f"{m}-adapter", backbone=bb, encoder=enc,
                              prompt={"system": ""})
    return out


def _compose(folders, *modalities: str) -> ComposedModel:
    """A fresh copy of the backbone (same weights) with the named adapter folders."""
    return sensorium.compose(tiny_backbone(), [folders[m] for m in modalities], tokenizer=word_tokenizer()).eval()


def _item(model: ComposedModel, modality: str, seed: int) -> torch.Tensor:
    raw = {"image": _picture, "video": _frames, "speech": lambda s: _wave(9000 + 2500 * s, s)}[modality](seed)
    return model.preprocess(modality, [raw])[0]


def _row(model: ComposedModel, items: dict[str, torch.Tensor], *, length: int = 0) -> list[int]:
    """Text with each given item's placeholder (expanded), in image, video, speech order; padded with text."""
    ids = [1, 3, 7]
    for i, m in enumerate(items):
        ids += [model.placeholder_ids[m], 20 + i, 30 + i]
    ids = model.expand_placeholders(ids + [8, 9, 15], {m: [x] for m, x in items.items()})
    return ids + [40 + k % 40 for k in range(max(0, length - len(ids)))]


def _media(rows_items: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    media = {}
    for m in MODALITIES:
        got = [r[m] for r in rows_items if m in r]
        if got:
            inputs = torch.stack(got) if m != "speech" else got
            media[m] = {"inputs": inputs, "counts": [int(m in r) for r in rows_items]}
    return media


@pytest.fixture(scope="module")
def full(folders) -> ComposedModel:
    return _compose(folders, *MODALITIES)


# ------------------------------------------------------------------------------ (a) absent media
@pytest.mark.parametrize("modality", MODALITIES)
def test_composed_equals_the_adapter_alone_when_other_media_are_absent(folders, full, modality):
    alone = _compose(folders, modality)
    items = {modality: _item(alone, modality, 1)}
    tokens = torch.tensor([_row(alone, items)])
    with torch.no_grad():
        expected = alone(tokens, media=_media([items]))
        got = full(tokens, media=_media([items]))
        bare = full(tokens.masked_fill(tokens >= 512, 5))  # same text, a plain token for the media
    assert float((got - expected).abs().max()) <= 1e-5
    assert float((got - bare).abs().max()) > 1e-2  # not vacuous: the media do change the logits


def test_a_batch_with_one_modality_per_row_equals_each_adapter_alone(folders, full):
    rows_items = [{m: _item(full, m, k)} for k, m in enumerate(MODALITIES)]
    length = max(len(_row(full, r)) for r in rows_items)
    tokens = torch.tensor([_row(full, r, length=length) for r in rows_items])
    with torch.no_grad():
        got = full(tokens, media=_media(rows_items))
        for b, m in enumerate(MODALITIES):
            alone = _compose(folders, m)
            expected = alone(tokens[b : b + 1], media=_media([rows_items[b]]))
            assert float((got[b] - expected[0]).abs().max()) <= 1e-5, m


# --------------------------------------------------------------------------------- (b) mixed media
def test_each_adapter_sees_only_its_own_media(full):
    items = {m: _item(full, m, 1) for m in MODALITIES}
    tokens = torch.tensor([_row(full, items)])
    seen: list[tuple[str, object]] = []
    hooks = [block.register_forward_pre_hook(lambda mod, args, m=m: seen.append((m, args[1])))
             for m in ("image", "video") for block in full.adapters[m].blocks]
    spliced: list[torch.Tensor] = []
    hooks.append(full.adapters["speech"].register_forward_pre_hook(lambda mod, args: spliced.append(args[0])))
    try:
        with torch.no_grad():
            state = full.prepare(tokens, _media([items]))
            full(tokens, media_state=state)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(m for m, _ in seen) == ["image", "image", "video", "video"]  # every block ran once
    assert all(media is state[m] for m, media in seen)  # ... on its own modality's inputs only
    assert state["image"].values.shape[1] == full.encoders["image"].num_tokens()  # image tokens
    assert state["video"].values.shape[1] == full.adapters["video"].perceiver.tokens_out  # video latents
    assert len(spliced) == 1 and spliced[0].shape[0] == 1  # the speech adapter saw the one utterance
    assert set(full.backbone.layers[0].blocks[i][0] for i in range(2)) == {"image", "video"}


@contextlib.contextmanager
def _scope(model: ComposedModel, scope: str):
    default = model.media_scope
    model.media_scope = scope
    try:
        yield
    finally:
        model.media_scope = default


@pytest.mark.parametrize("scope", ["until_other", "current"])
def test_mixed_prompt_runs_and_each_medium_changes_what_follows_it(full, scope):
    items = {m: _item(full, m, 1) for m in MODALITIES}
    tokens = torch.tensor([_row(full, items)])  # text, image, text, clip, text, speech, text
    with torch.no_grad(), _scope(full, scope):
        base = full(tokens, media=_media([items]))
        assert bool(torch.isfinite(base).all())
        for m in MODALITIES:
            other = dict(items, **{m: _item(full, m, 5) if m != "speech" else items[m].flip(0)})
            changed = full(tokens, media=_media([other]))
            first = int((tokens[0] == full.placeholder_ids[m]).nonzero()[0])
            assert torch.equal(changed[0, :first], base[0, :first]), m  # nothing before the medium moves
            if scope == "current" and m != "speech":  # a medium another modality followed leaves no trace
                assert torch.equal(changed, base), m
                continue
            # what follows does (float noise here is ~1e-7; random clips through a random encoder differ least)
            assert float((changed[0, first:] - base[0, first:]).abs().max()) > 1e-3, m


def _block_deltas(model: ComposedModel, tokens: torch.Tensor, media: dict) -> dict[str, torch.Tensor]:
    """Per cross-attention modality: the largest change its blocks make at each position ``(T,)`` (row 0)."""
    deltas = {m: torch.zeros(tokens.shape[1]) for m in ("image", "video")}

    def record(m):
        def hook(mod, args, out):
            deltas[m] = torch.maximum(deltas[m], (out - args[0])[0].abs().amax(-1))
        return hook

    hooks = [block.register_forward_hook(record(m)) for m in deltas for block in model.adapters[m].blocks]
    try:
        with torch.no_grad():
            model(tokens, media=media)
    finally:
        for h in hooks:
            h.remove()
    return deltas


@pytest.mark.parametrize("scope", ["until_other", "current", "all"])
def test_a_medium_is_seen_until_media_of_another_modality_arrive(full, scope):
    items = {m: _item(full, m, 1) for m in MODALITIES}
    tokens = torch.tensor([_row(full, items)])  # text, image, text, clip, text, speech, text
    first = {m: int((tokens[0] == full.placeholder_ids[m]).nonzero()[0]) for m in MODALITIES}
    with _scope(full, scope):
        deltas = _block_deltas(full, tokens, _media([items]))
        last = _block_deltas(full, tokens[:, : first["speech"]], _media([{m: items[m] for m in ("image", "video")}]))
    assert bool((last["video"][first["video"] :] > 0).all())  # the latest medium: seen to the end, in every scope
    for m, end in (("image", first["video"]), ("video", first["speech"])):
        assert float(deltas[m][: first[m]].abs().max()) == 0.0, m  # nothing before the medium
        after = deltas[m][end:]
        if scope == "current":  # another modality followed it: its blocks act nowhere, its turn reads as text
            assert float(deltas[m].max()) == 0.0, m
            continue
        assert bool((deltas[m][first[m] : end] > 0).all()), m  # its own stretch of text sees it
        if scope == "until_other":
            assert float(after.max()) == 0.0, m  # blocks give exactly zero once another modality arrived
        else:
            assert bool((after > 0).all()), m  # Flamingo rule: every later position still sees it


def test_media_given_side_by_side_are_all_seen_by_the_text_after_them(full):
    items = {m: _item(full, m, 2) for m in MODALITIES}
    ids = full.expand_placeholders([1, 3, *(full.placeholder_ids[m] for m in MODALITIES), 8, 9, 15],
                                   {m: [x] for m, x in items.items()})
    deltas = _block_deltas(full, torch.tensor([ids]), _media([items]))
    text = len(ids) - 3
    for m in ("image", "video"):
        assert bool((deltas[m][text:] > 0).all()), m


def test_other_media_start_hand_worked():
    from sensorium.compose import other_media_start

    ph = {"image": 100, "video": 101, "speech": 102}
    I, V, S, big = 100, 101, 102, torch.iinfo(torch.long).max
    tokens = torch.tensor([[5, I, I, 6, S, S, 7, V, 8, I, 9],
                           [0, 0, 0, 0, I, S, S, 5, V, 6, 7]])  # second row left-padded; image and speech side by side
    image = other_media_start(tokens, ph, "image", torch.tensor([[1, 2, 9], [4, big, big]]))
    assert image[0].tolist() == [4, 4, big]  # both images of the first run end at the speech run
    assert int(image[1, 0]) == 8  # the image beside the speech ends at the clip, not at the speech
    video = other_media_start(tokens, ph, "video", torch.tensor([[7], [8]]))
    assert video.tolist() == [[9], [big]]
    with pytest.raises(ValueError, match="media_scope must be one of"):
        sensorium.compose(tiny_backbone(), [], media_scope="latest")


def test_shared_prefix_length_hand_worked():
    from sensorium.compose import shared_prefix_length

    P, X = 100, -100  # a placeholder id; no label
    tokens = torch.tensor([[1, 2, 3, 4, 5, P, 7, 8], [1, 2, 3, 4, 6, P, 7, 9]])
    labels = torch.full_like(tokens, X)
    assert shared_prefix_length(tokens, labels, [P]) == 4  # rows part at position 4
    assert shared_prefix_length(tokens[:, [0, 1, 5, 2]], labels[:, :4], [P]) == 2  # a placeholder ends it
    labels[1, 3] = 9
    assert shared_prefix_length(tokens, labels, [P]) == 2  # position 2 predicts a label: it is not shared
    assert shared_prefix_length(tokens[:1, :3], labels[:1, :3], [P]) == 2  # one position is always left
    assert shared_prefix_length(tokens[:, 4:], labels[:, 4:], [P]) == 0


def _loss_and_grads(model, tokens, media, labels):
    model.zero_grad()
    loss = model(tokens, media=media, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.adapters.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "activation_checkpointing"])
def test_a_loss_after_shared_earlier_turns_equals_running_them_in_every_row(folders, monkeypatch, recompute):
    """A training batch whose chats start with the same earlier turns computes them once, without
    gradients: the loss and every adapter gradient equal those of running them in each row."""
    model = _compose(folders, *MODALITIES).requires_grad_(False)
    model.adapters.requires_grad_(True)
    model.backbone.activation_checkpointing = recompute
    rows_items = [{m: _item(model, m, k)} for k, m in enumerate(MODALITIES)]
    rows_items.append({m: _item(model, m, 5) for m in MODALITIES})  # all three in one row
    earlier = [1, 3, *(41 + k % 30 for k in range(24)), 2, 6]  # 28 shared positions, no placeholder, no label
    body = [_row(model, r) for r in rows_items]
    T = len(earlier) + max(map(len, body))
    tokens = torch.tensor([earlier + b + [0] * (T - len(earlier) - len(b)) for b in body])
    labels = torch.full_like(tokens, -100)
    for i, b in enumerate(body):  # the answer: the row's last three tokens
        end = len(earlier) + len(b)
        labels[i, end - 3 : end] = tokens[i, end - 3 : end]
    media = _media(rows_items)
    runs = []
    prefix_kv = model.backbone.prefix_kv
    monkeypatch.setattr(model.backbone, "prefix_kv", lambda x: runs.append(x.shape) or prefix_kv(x))

    shared_loss, shared_grads = _loss_and_grads(model, tokens, media, labels)
    # the earlier turns and the rows' common start (1, 3, 7) ran once, as one row
    assert runs == [(1, len(earlier) + 3, model.backbone.config.dim)]
    model.share_prefix = False
    loss, grads = _loss_and_grads(model, tokens, media, labels)
    assert len(runs) == 1
    assert abs(float(shared_loss - loss)) <= 1e-5 * float(loss)
    assert shared_grads.keys() == grads.keys() and {n.split(".")[0] for n in grads} == set(MODALITIES)
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 1e-3  # not vacuous
    for n, g in grads.items():  # fp32 summation order differs (one prefix row instead of four)
        assert float((shared_grads[n] - g).abs().max()) <= 1e-5 * scale, n


# ------------------------------------------------------------------------------ (c) generate(messages)
def test_generate_with_image_clip_and_speech_in_one_turn_and_multi_turn(full, tmp_path):
    wav = tmp_path / "utterance.wav"
    sf.write(wav, _wave(12000, 2).numpy(), SAMPLE_RATE)
    mixed = [{"role": "user", "content": [
        {"type": "image", "image": _picture(1)}, {"type": "video", "video": _frames(1)},
        {"type": "audio", "audio": str(wav)}, {"type": "text", "text": " what is this ?"}]}]
    chat = [
        {"role": "user", "content": [{"type": "image", "image": _picture(2)}, {"type": "text", "text": " what is this ?"}]},
        {"role": "assistant", "content": "a red circle ."},
        {"role": "user", "content": [{"type": "audio", "audio": (_wave(20000, 3).numpy(), SAMPLE_RATE)},
                                     {"type": "video", "video": _frames(2)}, {"type": "text", "text": " and this ?"}]},
    ]

    def run(chats, **kw) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in chats]
        texts = full.generate(chats, max_new_tokens=5, system="",
                              on_token=lambda row, t: ids[row].append(t), **kw)
        assert len(texts) == len(chats) and all(isinstance(t, str) for t in texts)
        return ids

    one, two = run([mixed])[0], run([chat])[0]
    assert len(one) == len(two) == 5, (one, two)  # no stop token in five steps (ids past the words: '')
    assert run([mixed, chat]) == [one, two]  # batched with left padding: the same answers
    guided = run([mixed, chat], contrastive_alpha=2.0)
    assert guided == [run([mixed], contrastive_alpha=2.0)[0], run([chat], contrastive_alpha=2.0)[0]]


# ------------------------------------------------------------------------------------ (d) refusals
def test_an_adapter_for_another_backbone_is_refused_by_folder(folders, tmp_path):
    small = Llama(dataclasses.replace(LlamaConfig.from_name("tiny"), n_layers=2)).requires_grad_(False)
    bad = save_adapter(CrossAttentionAdapter(CrossAttentionConfig.for_backbone(small.config, 512, every=2)),
                       tmp_path / "image-for-2-layers", backbone=small, encoder=tiny_encoder())
    bb = tiny_backbone()
    with pytest.raises(AdapterMismatchError, match="n_layers=2") as e:
        sensorium.compose(bb, [folders["video"], bad])
    assert str(e.value).startswith(str(bad)) and "n_layers=4" in str(e.value)
    assert not any(isinstance(layer, FusedLayer) for layer in bb.layers)  # nothing was fused


def test_conflicts_are_refused_and_leave_the_backbone_as_it_was(folders):
    bb = tiny_backbone()
    with pytest.raises(MediaMismatchError, match="one adapter per modality") as e:
        sensorium.compose(bb, [folders["image"], folders["video"], folders["image"]])
    assert str(folders["image"]) in str(e.value)
    assert not any(isinstance(layer, FusedLayer) for layer in bb.layers)  # the first two were rolled back
    first = sensorium.compose(bb, [folders["image"]])
    with pytest.raises(MediaMismatchError, match="already carries image blocks"):
        sensorium.compose(bb, [folders["image"]])  # the first model's blocks would see this one's images
    first.remove_adapter("image")
    sensorium.compose(bb, [folders["image"]])


def test_module_adapters_that_do_not_fit_are_refused(folders):
    bb = tiny_backbone()
    narrow = CrossAttentionAdapter(CrossAttentionConfig(dim=32, media_dim=16, n_heads=2, n_kv_heads=1, head_dim=16,
                                                        mlp_hidden=32, layers=[0]))
    with pytest.raises(AdapterMismatchError, match="writes 32-wide embeddings; the backbone's width is 64"):
        ComposedModel(bb, [narrow])
    deep = CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, 16, layers=[1, 6]))
    with pytest.raises(AdapterMismatchError, match=r"places blocks at layer\(s\) \[6\]; the backbone has 4 layers"):
        ComposedModel(bb, [deep])
    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match="reads 512-wide image features; its encoder gives 32-wide"):
        ComposedModel(bb, [CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, 512))],
                      encoders={"image": SpeechEncoder(SPEECH)})
    assert not any(isinstance(layer, FusedLayer) for layer in bb.layers)


def test_a_fine_tuned_twin_backbone_takes_the_adapters_with_a_warning(folders):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sensorium.compose(tiny_backbone(seed=1), [folders[m] for m in MODALITIES])
    assert sorted(model.adapters) == sorted(MODALITIES)
    assert sum(issubclass(w.category, AdapterHashWarning) for w in caught) == 3
