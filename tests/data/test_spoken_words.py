"""eSpeak NG synthesis through ctypes and the spoken-words synthetic set (FLAC shards, transcripts, French)."""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sensorium.data import espeak
from sensorium.data.espeak import Espeak, SpeechSynthesisError, synthesize
from sensorium.data.synthetic import (
    AUDIO_RATE,
    DIGITS,
    FRENCH,
    SPEECH_VARIANTS,
    SPEECH_VOICES,
    WORDS,
    _spoken_words_samples,
    default_split_sizes,
    french_translation,
    make_dataset,
)

pytest.importorskip("espeakng_loader", reason="pip install --no-deps espeakng-loader")

TEXT = "red cat book"


def test_synthesis_is_non_silent_float32_of_plausible_duration():
    audio, rate = synthesize(TEXT)
    assert rate == 22050, rate
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / rate
    assert 0.4 < seconds < 2.5, f"three words took {seconds:.2f} s"
    assert np.abs(audio).max() <= 1.0
    assert np.sqrt(np.mean(audio**2)) > 0.02, "synthesised audio is (nearly) silent"


def test_voice_and_pitch_change_the_audio_and_the_same_call_repeats_exactly():
    base, _ = synthesize(TEXT, voice="en-us", pitch=50)
    again, _ = synthesize(TEXT, voice="en-us", pitch=50)
    np.testing.assert_array_equal(base, again)  # a fresh library instance per call: no state carried over
    for other in (synthesize(TEXT, voice="en-us+f2", pitch=50)[0], synthesize(TEXT, voice="en-us", pitch=70)[0]):
        assert other.shape != base.shape or not np.array_equal(other, base)


def test_unknown_voice_or_variant_is_a_clear_error():
    with pytest.raises(SpeechSynthesisError, match="unknown eSpeak voice variant 'nope'"):
        synthesize(TEXT, voice="en+nope")
    with pytest.raises(SpeechSynthesisError, match="unknown eSpeak voice 'xx-nope'"):
        synthesize(TEXT, voice="xx-nope")
    with pytest.raises(ValueError, match="rate"):
        synthesize(TEXT, rate=20)


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import now raises ImportError
    with pytest.raises(SpeechSynthesisError, match="pip install --no-deps espeakng-loader"):
        Espeak().synthesize(TEXT)


_CHILD = """
import sys
from sensorium.data.espeak import Espeak, SpeechSynthesisError
try:
    Espeak(data_path=sys.argv[1]).synthesize("hello")
except SpeechSynthesisError as e:
    print(f"clear error: {e}")
    sys.exit(3)
print("no error")
"""


def _run_child(data_path: Path) -> subprocess.CompletedProcess:
    # a subprocess: should the library exit() or crash on bad data, pytest survives and the test fails
    return subprocess.run([sys.executable, "-c", _CHILD, str(data_path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["missing", "empty", "wrong-version"])
def test_bad_data_path_raises_a_clear_error_instead_of_exiting(tmp_path, case):
    folder = tmp_path / "espeak-ng-data"
    if case == "empty":
        folder.mkdir()
    elif case == "wrong-version":  # passes the file check; the library itself rejects it
        folder.mkdir()
        for name in espeak.REQUIRED_DATA_FILES:
            shutil.copy(Espeak().data_path / name, folder / name)
        data = bytearray((folder / "phondata").read_bytes())
        data[:4] = b"\x01\x02\x03\x04"  # phondata starts with its format version
        (folder / "phondata").write_bytes(bytes(data))
    proc = _run_child(folder)
    expected = {"missing": "does not exist", "empty": "lacks phontab", "wrong-version": "Wrong version"}[case]
    assert proc.returncode == 3, f"child exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert "clear error: eSpeak NG" in proc.stdout and expected in proc.stdout, proc.stdout


def test_french_is_word_by_word_for_digits_and_words():
    assert french_translation("three one four".split()) == "trois un quatre"
    assert french_translation("zero nine eight seven one".split()) == "zéro neuf huit sept un"
    assert french_translation("red cat book".split()) == "rouge chat livre"
    assert len(WORDS) == len(set(WORDS)) == 30 and len(DIGITS) == 10
    for word in DIGITS + WORDS:
        fr = FRENCH[word]
        assert fr == fr.lower() and " " not in fr, f"{word} -> {fr!r}: one lower-case French word expected"


def test_every_voice_of_the_set_exists_in_the_shipped_data():
    synth = Espeak()
    assert set(SPEECH_VOICES) <= set(synth.voices())
    assert {v for v in SPEECH_VARIANTS if v} <= set(synth.variants())


def _read_split(folder: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


@pytest.fixture(scope="module")
def spoken_words(tmp_path_factory) -> Path:
    return make_dataset("spoken-words", tmp_path_factory.mktemp("spoken"), num=8, seed=0, per_shard=100)


def test_make_dataset_writes_decodable_flac_with_transcripts(spoken_words):
    info = json.loads((spoken_words / "info.json").read_text())
    assert info["name"] == "spoken-words" and info["splits"] == default_split_sizes(8)
    voices = {v + (f"+{x}" if x else "") for v in SPEECH_VOICES for x in SPEECH_VARIANTS}
    for split, n in default_split_sizes(8).items():
        samples = _read_split(spoken_words / split)
        assert len(samples) == n, (split, len(samples))
        kinds = set()
        for s in samples[:20]:
            meta = json.loads(s["json"])
            audio, rate = sf.read(io.BytesIO(s["flac"]), dtype="float32")
            assert rate == AUDIO_RATE and audio.ndim == 1
            assert abs(len(audio) / rate - meta["attributes"]["seconds"]) < 1e-3
            assert np.abs(audio).max() > 0.1, "utterance is (nearly) silent"
            words = meta["text"].split()
            assert meta["translation"]["fr"] == french_translation(words)
            attrs = meta["attributes"]
            kinds.add(attrs["kind"])
            if attrs["kind"] == "digits":
                assert 3 <= len(words) <= 6 and set(words) <= set(DIGITS)
            else:
                assert 2 <= len(words) <= 4 and set(words) <= set(WORDS)
            assert attrs["voice"] in voices and 130 <= attrs["rate"] <= 210 and 30 <= attrs["pitch"] <= 70
            assert 20 <= attrs["snr_db"] <= 40
        assert kinds == {"digits", "words"} or split == "train", f"{split}: only {kinds}"


def test_generation_is_deterministic_given_the_rng():
    first = list(_spoken_words_samples(3, np.random.default_rng(5)))
    second = list(_spoken_words_samples(3, np.random.default_rng(5)))
    assert [s["json"] for s in first] == [s["json"] for s in second]
    assert [s["flac"] for s in first] == [s["flac"] for s in second]


def test_cli_data_accepts_spoken_words(monkeypatch, tmp_path):
    from sensorium import cli
    from sensorium.data import synthetic

    calls = []
    monkeypatch.setattr(synthetic, "make_dataset", lambda name, out, **kw: calls.append((name, kw)) or Path(out))
    assert cli.main(["data", "spoken-words", "--out", str(tmp_path), "--num", "8", "--seed", "3"]) == 0
    assert cli.main(["data", "spoken-words", "--out", str(tmp_path), "--num-eval", "5"]) == 0
    assert calls == [("spoken-words", {"num": 8, "seed": 3, "num_eval": None}),
                     ("spoken-words", {"num": None, "seed": 0, "num_eval": 5})]
