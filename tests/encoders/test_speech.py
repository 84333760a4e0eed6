"""Speech encoder and adapter: exact lengths, padding invariance, torchaudio parity, bad audio."""

import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from sensorium.compose import ComposedModel, MediaMismatchError
from sensorium.encoders.speech import (
    SAMPLE_RATE,
    AudioPreprocess,
    SpeechEncoder,
    SpeechEncoderSpec,
    conformer_forward,
)
from sensorium.errors import MediaError
from tests.tiny import randomise, tiny_backbone

SPEC = SpeechEncoderSpec(dim=32, num_layers=2, num_heads=4, ffn_dim=64, kernel_size=7)


def _wave(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SAMPLE_RATE
    return (0.3 * torch.sin(2 * torch.pi * (200 + 50 * seed) * t) + 0.05 * torch.randn(n, generator=g)).float()


@pytest.fixture(scope="module")
def encoder() -> SpeechEncoder:
    torch.manual_seed(0)
    enc = SpeechEncoder(SPEC)
    randomise(enc.conformer, seed=3)  # non-trivial batch-norm statistics and weights
    with torch.no_grad():
        for layer in enc.conformer.conformer_layers:
            bn = layer.conv_module.sequential[3]
            bn.running_var.abs_().add_(0.5)
    return enc


def test_masked_conformer_equals_torchaudio_on_unpadded_input(encoder):
    x = torch.randn(2, 23, SPEC.dim)
    ours = conformer_forward(encoder.conformer, x, torch.ones(2, 23, dtype=torch.bool))
    ref, _ = encoder.conformer(x, torch.tensor([23, 23]))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1600, 16000, 16159, 16160, 16161, 23999, 40000])
def test_output_length_is_exact(encoder, n):
    feats = encoder([_wave(n)])
    assert feats.values.shape[1] == encoder.output_length(n) == int(feats.mask.sum())
    adapter = SpeechAdapter(SpeechAdapterConfig(media_dim=SPEC.dim, dim=64, hidden=32, n_heads=4, mlp_hidden=64))
    emb, valid = adapter(feats.values, feats.mask)
    assert emb.shape[1] == adapter.output_length(encoder.output_length(n)) == int(valid.sum())


def test_an_utterance_alone_and_padded_in_a_batch_gives_the_same_features(encoder):
    short, long = _wave(12000, 1), _wave(30000, 2)
    alone = encoder([short])
    batch = encoder([long, short, _wave(20000, 3)])
    n = int(alone.mask.sum())
    assert int(batch.mask[1].sum()) == n and not bool(batch.mask[1, n:].any())
    torch.testing.assert_close(batch.values[1, :n], alone.values[0], atol=1e-5, rtol=1e-5)
    assert bool((batch.values[1, n:] == 0).all())
    adapter = randomise(SpeechAdapter(SpeechAdapterConfig(media_dim=SPEC.dim, dim=64, hidden=32, n_heads=4, mlp_hidden=64)))
    a, va = adapter(alone.values, alone.mask)
    b, vb = adapter(batch.values, batch.mask)
    torch.testing.assert_close(b[1][vb[1]], a[0][va[0]], atol=1e-5, rtol=1e-5)


def _composed(encoder):
    bb = tiny_backbone()
    adapter = randomise(SpeechAdapter(SpeechAdapterConfig.for_backbone(bb.config, SPEC.dim, hidden=32, n_heads=4)))
    return ComposedModel(bb, [adapter], encoders={"speech": encoder})


def test_composed_speech_padding_does_not_change_generation(encoder):
    model = _composed(encoder)
    ph = model.placeholder_ids["speech"]
    waves = [_wave(12000, 1), _wave(30000, 2)]

    def prompt(w):
        return model.expand_placeholders([5, ph, 7, 8], {"speech": [w]})

    alone = model.generate_ids([prompt(waves[0])], {"speech": {"inputs": [waves[0]], "counts": [1]}}, max_new_tokens=6)
    both = model.generate_ids([prompt(w) for w in waves], {"speech": {"inputs": waves, "counts": [1, 1]}},
                              max_new_tokens=6)
    assert both[0] == alone[0]
    assert len(prompt(waves[1])) - 3 == model.item_positions("speech", waves[1]) > model.item_positions("speech", waves[0])


def test_speech_positions_that_do_not_match_the_audio_are_a_clear_error(encoder):
    model = _composed(encoder)
    ph = model.placeholder_ids["speech"]
    w = _wave(16000)
    n = model.item_positions("speech", w)
    tokens = torch.tensor([[5] + [ph] * (n - 1) + [7]])
    with pytest.raises(MediaMismatchError, match=rf"{n - 1} <\|speech\|> positions in the text, but 1 speech item\(s\) filling {n}"):
        model(tokens, media={"speech": {"inputs": [w], "counts": [1]}})


def _flac(data: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC")
    return buf.getvalue()


def test_audio_preprocess_mono_resample_and_limits():
    pre = AudioPreprocess(SpeechEncoderSpec(max_seconds=2.0))
    stereo = np.stack([np.sin(np.arange(22050) / 10), np.cos(np.arange(22050) / 10)], axis=1).astype(np.float32) * 0.5
    wave = pre(_flac(stereo, 22050))
    assert wave.ndim == 1 and abs(wave.numel() - SAMPLE_RATE) <= 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long = pre((np.full(3 * SAMPLE_RATE, 0.1, dtype=np.float32), SAMPLE_RATE))
    assert long.numel() == 2 * SAMPLE_RATE and any("truncated" in str(w.message) for w in caught)
    strict = AudioPreprocess(SpeechEncoderSpec(max_seconds=2.0, truncate=False))
    with pytest.raises(MediaError, match="too long"):
        strict((np.full(3 * SAMPLE_RATE, 0.1, dtype=np.float32), SAMPLE_RATE))


@pytest.mark.parametrize("raw, message", [
    (b"", "zero bytes"),
    (b"RIFF\x00\x00garbage that is no audio", "not readable audio"),
    ((np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE), "silent"),
    ((np.full(800, 0.5, dtype=np.float32), SAMPLE_RATE), "too short"),
    ((np.array([0.1, np.nan] * 8000, dtype=np.float32), SAMPLE_RATE), "NaN"),
])
def test_bad_audio_is_a_clear_media_error(raw, message):
    with pytest.raises(MediaError, match=message):
        AudioPreprocess(SpeechEncoderSpec())(raw)


def test_truncated_flac_is_rejected():
    data = _flac(np.sin(np.arange(16000) / 5).astype(np.float32) * 0.5, SAMPLE_RATE)
    with pytest.raises(MediaError):
        AudioPreprocess(SpeechEncoderSpec())(data[: len(data) // 4])
