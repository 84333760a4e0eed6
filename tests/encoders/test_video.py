"""Video: frame sampling, the decord reader, bad clips, the video encoder, perceiver and video adapter."""

import io

import av
import numpy as np
import pytest
import torch

from sensorium.adapters import load_adapter, save_adapter
from sensorium.adapters.cross_attention import (
    CrossAttentionAdapter,
    CrossAttentionConfig,
    VideoCrossAttentionAdapter,
)
from sensorium.adapters.perceiver import PerceiverConfig, PerceiverResampler
from sensorium.compose import ComposedModel
from sensorium.data.shards import video_sample_decoder
from sensorium.data.synthetic import encode_mp4, render_moving_clip
from sensorium.encoders import ImageEncoderSpec, VideoEncoder, VideoEncoderSpec
from sensorium.encoders.video import DecordReader, sample_indices
from sensorium.errors import MediaError
from tests.tiny import randomise, tiny_backbone


@pytest.fixture(scope="module")
def clip():
    frames, attrs = render_moving_clip(np.random.default_rng(0), size=64, frames=12)
    return encode_mp4(frames), frames, attrs


def _all_frames_pyav(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_sample_indices_are_uniform_and_repeat_short_clips():
    assert sample_indices(16, 4) == [2, 6, 10, 14]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(1, 3) == [0, 0, 0]


def test_decord_reads_exactly_the_sampled_frames(clip, tmp_path):
    data, _, _ = clip
    reference = _all_frames_pyav(data)
    got = DecordReader()(data, 4)
    assert got.shape == (4, 64, 64, 3)
    idx = sample_indices(len(reference), 4)
    assert np.abs(got.astype(int) - reference[idx].astype(int)).max() <= 2  # same decoder family, same frames
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    assert np.array_equal(DecordReader()(path, 4), got)


@pytest.mark.parametrize("bad,message", [(b"", "zero-length"), (b"not a video at all" * 10, "not a readable video")])
def test_bad_clips_raise_media_errors(bad, message):
    with pytest.raises(MediaError, match=message):
        DecordReader()(bad, 4)


def test_truncated_clip_and_missing_file(clip, tmp_path):
    data, _, _ = clip
    with pytest.raises(MediaError):
        DecordReader()(data[: len(data) // 4], 4)
    with pytest.raises(MediaError, match="no such file"):
        DecordReader()(tmp_path / "missing.mp4", 4)


def test_video_encoder_runs_the_image_encoder_per_frame(clip):
    enc = VideoEncoder(VideoEncoderSpec(image=ImageEncoderSpec(name="resnet10t", image_size=32), num_frames=4))
    x = torch.stack([enc.preprocess(clip[0]), enc.preprocess(np.stack(clip[1]))])  # bytes and frames
    assert x.shape == (2, 4, 3, 32, 32)
    feats = enc(x).values
    assert feats.shape == (2, 4 * enc.tokens_per_frame, enc.out_dim)
    per_frame = enc.image(x[0]).values.reshape(1, -1, enc.out_dim)
    torch.testing.assert_close(feats[:1], per_frame)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_perceiver_merges_groups_and_knows_frame_order():
    cfg = PerceiverConfig(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4, depth=1, n_heads=4)
    p = randomise(PerceiverResampler(cfg))
    x = torch.randn(2, 8, 5, 12)
    out = p(x)
    assert out.shape == (2, 2, 3, 16) and p.tokens_out == 6
    swapped = x[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    assert not torch.allclose(p(swapped)[:, 0], out[:, 0])  # frame order inside a group matters
    torch.testing.assert_close(p(swapped)[:, 1], out[:, 1])  # the other group is untouched
    assert PerceiverConfig(media_dim=4, dim=8, num_frames=8, group=32, n_heads=2).group == 8


def test_token_positions_tell_the_perceiver_where_each_token_of_a_frame_is():
    x = torch.randn(2, 8, 5, 12)
    shuffled = x[:, :, [3, 0, 4, 1, 2]]  # the same cells, listed in another order in every frame
    bag = randomise(PerceiverResampler(PerceiverConfig(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4,
                                                       depth=1, n_heads=4)))
    torch.testing.assert_close(bag(shuffled), bag(x))  # without them, a frame is a bag of tokens
    placed = randomise(PerceiverResampler(PerceiverConfig(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4,
                                                          depth=1, n_heads=4, tokens_per_frame=5)))
    assert (placed(shuffled) - placed(x)).abs().max() > 1e-3
    with pytest.raises(AssertionError, match="expected 5 tokens per frame"):
        placed(torch.randn(1, 8, 6, 12))


def test_motion_tokens_carry_the_change_between_frames_and_not_what_stays():
    cfg = PerceiverConfig(media_dim=12, dim=16, num_latents=3, num_frames=4, group=4, depth=1, n_heads=4,
                          motion_tokens=True)
    p = PerceiverResampler(cfg)
    x = torch.randn(2, 4, 5, 12)
    m = p.motion(x)
    assert m.shape == (2, 4, 12) and m[:, 0].abs().max() == 0  # nothing changed before the first frame
    torch.testing.assert_close(p.motion(x + torch.randn(5, 12)), m)  # what every frame shares cancels
    reverse = p.motion(x[:, [1, 0]].repeat(1, 2, 1, 1))
    torch.testing.assert_close(reverse[:, 1], -p.motion(x[:, :2].repeat(1, 2, 1, 1))[:, 1])  # direction flips
    # with no frame embedding, a group is a bag of its frames' tokens: only motion tokens see the order
    without = PerceiverResampler(PerceiverConfig(**{**cfg.__dict__, "motion_tokens": False}))
    randomise(p)
    without.load_state_dict({k: v for k, v in p.state_dict().items() if not k.startswith("motion")})
    with torch.no_grad():
        p.frame_embedding.zero_()
        without.frame_embedding.zero_()
    backwards = x.flip(1)
    torch.testing.assert_close(without(backwards), without(x))
    assert (p(backwards) - p(x)).abs().max() > 1e-3


def test_motion_summary_is_one_more_token_per_group_holding_the_net_change_over_the_group():
    cfg = PerceiverConfig(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4, depth=1, n_heads=4,
                          motion_tokens=True, motion_summary=True)
    p = randomise(PerceiverResampler(cfg))
    plain = PerceiverResampler(PerceiverConfig(**{**cfg.__dict__, "motion_summary": False}))
    plain.load_state_dict(p.state_dict())  # no weights of its own: it shares the motion norm and the projections
    x = torch.randn(2, 8, 5, 12)
    out = p(x)
    assert out.shape == (2, 2, 4, 16) and p.tokens_out == 8
    torch.testing.assert_close(out[:, :, :3], plain(x))  # the latents are untouched
    pooled = x.mean(2)
    for g in range(2):
        change = pooled[:, 4 * g + 3] - pooled[:, 4 * g]  # last frame of the group minus its first
        expected = p.norm(p.in_proj(p.motion_norm(change))) + p.group_embedding[g]
        torch.testing.assert_close(out[:, g, 3], expected)
    middle = x.clone()
    middle[:, [1, 2, 5, 6]] = torch.randn(2, 4, 5, 12)
    torch.testing.assert_close(p(middle)[:, :, 3], out[:, :, 3])  # only the ends of a group count
    torch.testing.assert_close(p(x + torch.randn(5, 12))[:, :, 3], out[:, :, 3])  # what stays cancels
    backwards = p(x.flip(1))[:, 0, 3] - p.group_embedding[0]  # the second group's frames, played backwards
    assert (backwards - (out[:, 1, 3] - p.group_embedding[1])).abs().max() > 1e-3  # is another motion


def _video_adapter(bb, enc_dim=768, layers=(0, 2), **perceiver):
    cfg = CrossAttentionConfig.for_backbone(bb.config, 32, layers=list(layers))
    return VideoCrossAttentionAdapter(cfg, PerceiverConfig(media_dim=enc_dim, dim=32, num_latents=4, num_frames=4,
                                                           group=4, depth=1, n_heads=4, **perceiver))


@pytest.mark.parametrize("perceiver", [{}, dict(motion_tokens=True, motion_summary=True)], ids=["plain", "summary"])
def test_video_adapter_roundtrip_and_generation(tmp_path, clip, perceiver):
    bb = tiny_backbone()
    enc = VideoEncoder(VideoEncoderSpec(image=ImageEncoderSpec(name="resnet10t", image_size=32), num_frames=4))
    adapter = randomise(_video_adapter(bb, enc.out_dim, **perceiver))
    model = ComposedModel(bb, [adapter], encoders={"video": enc})
    ph = model.placeholder_ids["video"]
    prompts = [[1, 2, ph, 5, 6]]
    media = {"video": {"inputs": enc.preprocess(clip[0])[None], "counts": [1]}}
    out = model.generate_ids(prompts, media, max_new_tokens=5, stop_ids=[])
    assert out == model.generate_ids(prompts, media, max_new_tokens=5, stop_ids=[], use_cache=False)
    folder = save_adapter(adapter, tmp_path / "v", backbone=bb, encoder=enc)
    from sensorium.adapters.artifact import load_encoder

    bb2 = tiny_backbone()
    loaded = load_adapter(folder, backbone=bb2)
    assert loaded.perceiver_config == adapter.perceiver_config
    assert loaded.resample(torch.randn(1, 4 * enc.tokens_per_frame, enc.out_dim)).shape[1] == 4 + bool(perceiver)
    again = ComposedModel(bb2, [loaded], encoders={"video": load_encoder(folder)})
    assert again.generate_ids(prompts, media, max_new_tokens=5, stop_ids=[]) == out


def test_video_blocks_initialise_from_an_image_adapter():
    bb = tiny_backbone()
    image = randomise(CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, 32, every=1)))
    video = _video_adapter(bb, layers=(0, 2))
    video.init_from(image)
    for layer, block in zip(video.layers, video.blocks, strict=True):
        ref = image.blocks[image.layers.index(layer)]
        assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), ref.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="no block at layer"):
        _video_adapter(bb, layers=(1,)).init_from(
            CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, 32, every=2)))


def test_video_sample_decoder_marks_bad_clips(clip):
    enc = VideoEncoder(VideoEncoderSpec(image=ImageEncoderSpec(name="resnet10t", image_size=32), num_frames=4))
    decode = video_sample_decoder(enc.transform)
    good = decode({"__key__": "a", "__url__": "s.tar", "mp4": clip[0], "json": b'{"text": "a red circle moving left"}'})
    assert good["media"]["video"][0].shape == (4, 3, 32, 32)
    for payload, reason in ((b"", "zero bytes"), (b"garbage" * 20, "not a readable video")):
        bad = decode({"__key__": "b", "__url__": "s.tar", "mp4": payload, "json": b'{"text": "x"}'})
        assert reason in bad["__bad__"] and "s.tar:b.mp4" in bad["__bad__"]


def test_positions_in_keys_only_steer_the_attention_but_reach_only_the_chosen_heads_values(monkeypatch):
    cfg = dict(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4, depth=2, n_heads=4, tokens_per_frame=5,
               motion_tokens=True)
    keyed = randomise(PerceiverResampler(PerceiverConfig(**cfg, positions_in_keys_only=True)))
    mixed = PerceiverResampler(PerceiverConfig(**cfg))
    mixed.load_state_dict(keyed.state_dict())  # the same weights; only where the embeddings go differs
    values = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: values.append(v) or sdpa(q, k, v, **kw))
    split = PerceiverResampler(PerceiverConfig(**cfg, positions_in_keys_only=True, position_value_heads=1))
    split.load_state_dict(keyed.state_dict())
    same = torch.randn(12).expand(2, 8, 5, 12)  # every cell of every frame looks the same
    for model, heads_with_positions in ((keyed, []), (mixed, [0, 1, 2, 3]), (split, [3])):
        values.clear()
        model(same)
        assert len(values) == 2
        for v in values:  # (I*groups, heads, 4 frames * 5 cells + 4 motion tokens + 3 latents, head dim)
            cells, motion = v[:, :, :20], v[:, :, 20:24]
            spread = torch.maximum((cells - cells[:, :, :1]).abs().amax((0, 2, 3)),
                                   (motion - motion[:, :, :1]).abs().amax((0, 2, 3)))  # per head
            assert (spread > 1e-3).nonzero().flatten().tolist() == heads_with_positions
    x = torch.randn(2, 8, 5, 12)
    assert (keyed(x[:, :, [3, 0, 4, 1, 2]]) - keyed(x)).abs().max() > 1e-4  # still knows where each cell is
    assert (keyed(x[:, [1, 0, 2, 3, 4, 5, 6, 7]]) - keyed(x)).abs().max() > 1e-4  # and which frame came first


@pytest.mark.parametrize("change,message", [
    (dict(group=3), "num_frames 8 is not a multiple of group 3"),
    (dict(positions_in_keys_only=True, position_value_heads=5), r"position_value_heads must be in 0\.\.4, got 5"),
    (dict(position_value_heads=1), "position_value_heads needs positions_in_keys_only"),
    (dict(motion_summary=True), "motion_summary needs motion_tokens"),
])
def test_perceiver_config_refuses_impossible_settings(change, message):
    cfg = dict(media_dim=12, dim=16, num_latents=3, num_frames=8, group=4, n_heads=4) | change
    with pytest.raises(ValueError, match=message):
        PerceiverConfig(**cfg)
