"""The default video recipe end to end: clip generation, the feature cache and the video adapter on the
pretrained frame encoder, then the held-out test split.

Slow (20 to 28 minutes on 2 CPU cores: clips and their features 4 to 8, the recipe's 650 training steps
15 to 20, at most 22 by its own cap): the adapter must name the colour, the shape and the direction of
motion (knowable only from several frames) on >= 90 % of the 400 held-out test clips. Runs in a temporary
working directory, so the recipe's relative paths (data/, runs/) land there.
"""

import pytest

from sensorium.eval.metrics import MOVING_VOCABULARY, attribute_accuracy


@pytest.mark.slow
def test_moving_shapes_recipe_learns_colour_shape_and_direction(video_run):
    scores = attribute_accuracy(video_run.results, MOVING_VOCABULARY)
    print(f"encoder {video_run.minutes['encoder']:.1f} min + video recipe {video_run.minutes['adapter']:.1f} min; "
          f"test scores {scores}")
    assert len(video_run.results) == 400
    assert min(scores["colour"], scores["shape"], scores["direction"]) >= 0.90
