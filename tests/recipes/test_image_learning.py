"""The default image recipes end to end: encoder pretraining + cross-attention adapter, then the test split.

Slow (about 14 minutes on 2 CPU cores): the adapter must name colour and shape on >= 90 % of the 400
held-out test images. The recipes bound their own time (encoder: 300 steps; adapter: max_time 11 min).
Runs in a temporary working directory, so the recipes' relative paths (data/, runs/) land there.
"""

import json
import time
from pathlib import Path

import pytest

from sensorium.cli import main
from sensorium.eval.metrics import attribute_accuracy
from tests.recipes.conftest import RECIPES


@pytest.mark.slow
def test_shapes_recipes_learn_colour_and_shape(tmp_path, monkeypatch, shapes_encoder):
    encoder, encoder_minutes = shapes_encoder
    monkeypatch.chdir(tmp_path)
    recipe = ["--config", str(RECIPES / "image/shapes.yaml"), "--model.encoder.checkpoint", str(encoder)]
    t0 = time.perf_counter()
    assert main(["fit", *recipe]) == 0
    adapter_minutes = (time.perf_counter() - t0) / 60
    assert main(["test", *recipe, "--model.init_adapter", "runs/image/adapter"]) == 0
    results = [json.loads(line) for line in Path("runs/image/test_predictions.jsonl").read_text().splitlines()]
    scores = attribute_accuracy(results)
    print(f"encoder {encoder_minutes:.1f} min + adapter {adapter_minutes:.1f} min; test scores {scores}")
    assert len(results) >= 200
    assert scores["colour_and_shape"] >= 0.90
