"""sensorium generate --audio (and --contrastive-alpha): speech in a chat turn; bad audio is one error line."""

import numpy as np
import pytest
import soundfile as sf
import torch

from sensorium.adapters import save_adapter
from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from sensorium.backbone import load_backbone
from sensorium.cli import main
from sensorium.encoders.speech import SAMPLE_RATE, SpeechEncoder, SpeechEncoderSpec
from tests.conftest import make_hf_llama
from tests.test_compose import word_tokenizer
from tests.tiny import randomise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF backbone folder with a word-level tokenizer.json, a speech adapter folder and audio files."""
    root = tmp_path_factory.mktemp("cli-audio")
    make_hf_llama(root / "backbone")  # vocab 128 (the 97 words fit), width 64, 2 layers
    word_tokenizer().tok.save(str(root / "backbone" / "tokenizer.json"))
    bb = load_backbone(root / "backbone")
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderSpec(dim=32, num_layers=1, num_heads=4, ffn_dim=64, kernel_size=7))
    adapter = randomise(SpeechAdapter(SpeechAdapterConfig.for_backbone(bb.config, 32, hidden=32, n_heads=4)))
    save_adapter(adapter, root / "speech", backbone=bb, encoder=encoder, prompt={"system": ""})
    t = np.arange(12000) / SAMPLE_RATE
    sf.write(root / "hello.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE)
    sf.write(root / "quiet.flac", np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    (root / "noise.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot audio at all")
    return root


def _generate(setup, *extra: str) -> list[str]:
    return ["generate", "--backbone", str(setup / "backbone"), "--adapter", str(setup / "speech"),
            "--prompt", "what is this ?", "--max-new-tokens", "4", *extra]


def test_audio_runs_a_chat_turn_with_speech(setup, capsys):
    assert main(_generate(setup, "--audio", str(setup / "hello.wav"), "--audio", str(setup / "hello.wav"))) == 0
    assert main(_generate(setup, "--audio", str(setup / "hello.wav"), "--contrastive-alpha", "2.5")) == 0
    err = capsys.readouterr().err
    assert err.count("tokens in") == 2 and "error" not in err


@pytest.mark.parametrize("name, message", [
    ("noise.wav", "not readable audio"),
    ("quiet.flac", "silent"),
    ("missing.wav", "no such file"),
])
def test_bad_audio_is_one_error_line(setup, capsys, name, message):
    path = setup / name
    rc = main(_generate(setup, "--audio", str(path)))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sensorium: error: {path}: ") and message in err, err


def test_audio_without_a_speech_adapter_is_one_error_line(setup, capsys):
    rc = main(["generate", "--backbone", str(setup / "backbone"), "--prompt", "hi", "--audio", str(setup / "hello.wav")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err == f"sensorium: error: {setup / 'hello.wav'}: --audio needs a speech adapter (--adapter DIR); composed: none"


def test_negative_contrastive_alpha_is_a_usage_error(setup, capsys):
    with pytest.raises(SystemExit) as e:
        main(_generate(setup, "--contrastive-alpha", "-1"))
    assert e.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err
