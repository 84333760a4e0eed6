"""The default image recipes end to end: encoder pretraining + cross-attention adapter, then the test split.

Slow (about 14 minutes on 2 CPU cores): the adapter must name colour and shape on >= 90 % of the 400
held-out test images. The recipes bound their own time (encoder: 300 steps; adapter: max_time 11 min).
Runs in a temporary working directory, so the recipes' relative paths (data/, runs/) land there.
"""

import pytest

from sensorium.eval.metrics import attribute_accuracy
from tests.recipes.conftest import fit_and_test


@pytest.mark.slow
def test_shapes_recipes_learn_colour_and_shape(tmp_path, monkeypatch, shapes_encoder):
    encoder, encoder_minutes = shapes_encoder
    monkeypatch.chdir(tmp_path)
    results, adapter_minutes = fit_and_test("image/shapes.yaml", "runs/image", "--model.encoder.checkpoint", str(encoder))
    scores = attribute_accuracy(results)
    print(f"encoder {encoder_minutes:.1f} min + adapter {adapter_minutes:.1f} min; test scores {scores}")
    assert len(results) >= 200
    assert scores["colour_and_shape"] >= 0.90
