"""Speech training on a tiny local backbone: bad audio skipped, counted and reported; CTC pretraining runs."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sensorium.cli import main
from sensorium.data.synthetic import make_dataset
from tests.training.test_image_training import tiny_backbone_folder

pytest.importorskip("espeakng_loader")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ENCODER = {"dim": 32, "num_layers": 1, "num_heads": 4, "ffn_dim": 64, "kernel_size": 7, "max_seconds": 5.0,
           "truncate": False}


def _flac(data: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC")
    return buf.getvalue()


BAD = {
    "bad-silent": (_flac(np.zeros(16000, dtype=np.float32)), "silent"),
    "bad-short": (_flac(np.full(400, 0.3, dtype=np.float32)), "too short"),
    "bad-long": (_flac((np.sin(np.arange(16000 * 6) / 7) * 0.3).astype(np.float32)), "too long"),
    "bad-nan": (np.array([0.1, np.nan] * 8000, dtype=np.float32), "NaN"),
    "bad-garbage": (b"fLaC this is not audio at all", "not readable audio"),
    "bad-empty": (b"", "zero bytes"),
}


def _add_bad_samples(shard: Path) -> None:
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data))
        for key, (data, _) in BAD.items():
            if isinstance(data, np.ndarray):  # NaN audio: a float WAV keeps the NaNs
                buf = io.BytesIO()
                sf.write(buf, data, 16000, format="WAV", subtype="FLOAT")
                name, data = f"{key}.wav", buf.getvalue()
            else:
                name = f"{key}.flac"
            caption = json.dumps({"text": "one two", "translation": {"fr": "un deux"}}).encode()
            for n, payload in ((name, data), (f"{key}.json", caption)):
                info = tarfile.TarInfo(n)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def speech_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    backbone = tiny_backbone_folder(root / "backbone")
    data = make_dataset("spoken-words", root / "spoken", num=24, seed=0)
    for shard in sorted((data / "train").glob("*.tar")):
        _add_bad_samples(shard)
    return root, backbone, data


def test_bad_audio_is_skipped_counted_and_reported(speech_setup, capsys, monkeypatch):
    root, backbone, data = speech_setup
    monkeypatch.chdir(root)
    # 30 samples (6 bad) in batches of 10: three steps read the training split once
    assert main([
        "fit", "--config", str(RECIPES / "speech/spoken_words.yaml"), "--model.backbone", str(backbone),
        "--model.encoder", json.dumps({**ENCODER, "checkpoint": None}), "--model.tasks", "[asr, translate]", "--model.max_bad_fraction", "0.5",
        "--model.adapter_dir", str(root / "adapter"), "--data.root", str(data), "--data.batch_size", "10",
        "--data.num_workers", "0", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(root / "logs"),
    ]) == 0
    err = capsys.readouterr().err
    assert "skipped 6 unreadable samples of 30" in err, err[-3000:]
    for key, (_, reason) in BAD.items():
        assert any(key in line and reason in line for line in err.splitlines()), (key, err[-3000:])
    manifest = json.loads((root / "adapter" / "manifest.json").read_text())
    assert manifest["kind"] == "speech" and manifest["encoder"]["kind"] == "speech"
    assert manifest["prompt"]["instruction"] == "Repeat after me in English:"
    # the checkpoint's hyper-parameters build the module again (`sensorium test --ckpt_path`)
    assert main([
        "test", "--config", str(RECIPES / "speech/spoken_words.yaml"), "--ckpt_path", "runs/speech/checkpoints/last.ckpt",
        "--data.root", str(data), "--data.num_workers", "0", "--trainer.limit_test_batches", "1",
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
    ]) == 0


def test_ctc_pretraining_runs_and_writes_the_encoder(speech_setup, monkeypatch):
    root, _, data = speech_setup
    monkeypatch.chdir(root)
    out = root / "encoder.safetensors"
    assert main([
        "fit", "--config", str(RECIPES / "speech/spoken_words_encoder.yaml"), "--model.encoder", json.dumps(ENCODER),
        "--model.out", str(out), "--data.root", str(data), "--data.batch_size", "8", "--data.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger.init_args.save_dir", str(root / "enc_logs"),
    ]) == 0
    from sensorium.encoders.speech import SpeechEncoder, SpeechEncoderSpec

    enc = SpeechEncoder(SpeechEncoderSpec(**{**ENCODER, "checkpoint": str(out)}))
    assert not any(p.requires_grad for p in enc.parameters())
