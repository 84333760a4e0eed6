"""The default speech recipes end to end: CTC encoder pretraining + speech adapter, then the test split.

Slow (about 17 minutes on 2 CPU cores; the recipes bound their own time: encoder max_time 8 min, adapter
max_time 10 min): the adapter must transcribe the 400 held-out utterances with WER <= 10 % (jiwer, after
lower-casing and removing punctuation). Runs in a temporary working directory.
"""

import time

import pytest

from sensorium.cli import main
from sensorium.eval import wer
from tests.recipes.conftest import RECIPES, fit_and_test

pytest.importorskip("espeakng_loader")


@pytest.mark.slow
def test_spoken_words_recipes_transcribe_held_out_speech(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["fit", "--config", str(RECIPES / "speech/spoken_words_encoder.yaml")]) == 0
    encoder_minutes = (time.perf_counter() - t0) / 60
    results, adapter_minutes = fit_and_test("speech/spoken_words.yaml", "runs/speech")
    score = wer([r["prediction"] for r in results], [r["reference"] for r in results])
    print(f"data + encoder {encoder_minutes:.1f} min + adapter {adapter_minutes:.1f} min; test WER {score:.3f}")
    assert len(results) >= 300
    assert encoder_minutes + adapter_minutes <= 20
    assert score <= 0.10
