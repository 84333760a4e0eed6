"""The default image recipes end to end: encoder pretraining + cross-attention adapter, then the test split.

Slow (about 14 minutes on 2 CPU cores): the adapter must name colour and shape on >= 90 % of the 400
held-out test images. The recipes bound their own time (encoder: 300 steps; adapter: max_time 11 min).
Runs in a temporary working directory, so the recipes' relative paths (data/, runs/) land there.
"""

import pytest

from sensorium.eval.metrics import attribute_accuracy


@pytest.mark.slow
def test_shapes_recipes_learn_colour_and_shape(image_run):
    scores = attribute_accuracy(image_run.results)
    print(f"encoder {image_run.minutes['encoder']:.1f} min + adapter {image_run.minutes['adapter']:.1f} min; "
          f"test scores {scores}")
    assert len(image_run.results) >= 200
    assert scores["colour_and_shape"] >= 0.90
