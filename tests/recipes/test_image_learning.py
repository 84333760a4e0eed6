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

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.slow
def test_shapes_recipes_learn_colour_and_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["fit", "--config", str(RECIPES / "image/shapes_encoder.yaml")]) == 0
    t_enc = time.perf_counter() - t0
    assert main(["fit", "--config", str(RECIPES / "image/shapes.yaml")]) == 0
    t_total = time.perf_counter() - t0
    assert main(["test", "--config", str(RECIPES / "image/shapes.yaml"), "--model.init_adapter", "runs/image/adapter"]) == 0
    results = [json.loads(line) for line in Path("runs/image/test_predictions.jsonl").read_text().splitlines()]
    scores = attribute_accuracy(results)
    print(f"encoder {t_enc / 60:.1f} min, both stages {t_total / 60:.1f} min, test scores {scores}")
    assert len(results) >= 200
    assert scores["colour_and_shape"] >= 0.90
