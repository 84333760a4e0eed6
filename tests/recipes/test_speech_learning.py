"""The default speech recipes end to end: CTC encoder pretraining + speech adapter, then the test split.

Slow (about 17 minutes on 2 CPU cores; the recipes bound their own time: encoder max_time 8 min, adapter
max_time 10 min): the adapter must transcribe the 400 held-out utterances with WER <= 10 % (jiwer, after
lower-casing and removing punctuation). Runs in a temporary working directory.
"""

import json
import time
from pathlib import Path

import pytest

from sensorium.cli import main
from sensorium.eval import wer
from tests.recipes.conftest import RECIPES

pytest.importorskip("espeakng_loader")


@pytest.mark.slow
def test_spoken_words_recipes_transcribe_held_out_speech(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["fit", "--config", str(RECIPES / "speech/spoken_words_encoder.yaml")]) == 0
    t1 = time.perf_counter()
    recipe = ["--config", str(RECIPES / "speech/spoken_words.yaml")]
    assert main(["fit", *recipe]) == 0
    t2 = time.perf_counter()
    assert main(["test", *recipe, "--model.init_adapter", "runs/speech/adapter"]) == 0
    results = [json.loads(line) for line in Path("runs/speech/test_predictions.jsonl").read_text().splitlines()]
    score = wer([r["prediction"] for r in results], [r["reference"] for r in results])
    print(f"data + encoder {(t1 - t0) / 60:.1f} min + adapter {(t2 - t1) / 60:.1f} min; test WER {score:.3f}")
    assert len(results) >= 300
    assert (t2 - t0) / 60 <= 20
    assert score <= 0.10
