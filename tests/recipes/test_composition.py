"""The image, video and speech adapters the shipped recipes train, composed on one backbone: each modality
scored by the demo's evaluation on 128 held-out samples with its adapter alone, inside the composed model,
and inside the composed model after a turn of each of the two other modalities (an image, a clip or an
utterance with its reference answer).

Slow: it needs the three recipe runs (shared with the learning tests of this folder, about 65 minutes
together on 2 CPU cores) and then about 4 minutes of evaluation. Composed must equal alone, and in a chat
each modality must stay within 2 points of alone (image: colour and shape right; video: direction; speech:
WER).
"""

import io
import os

import pytest

from sensorium import demo
from tests.recipes.conftest import working_folder


@pytest.mark.slow
def test_composed_adapters_score_as_alone_in_a_chat(tmp_path, image_run, video_run, speech_run):
    links = {"data/shapes": image_run.folder / "data/shapes", "data/moving_shapes": video_run.folder / "data/moving_shapes",
             "data/spoken_words": speech_run.folder / "data/spoken_words",
             "runs/image/adapter": image_run.folder / "runs/image/adapter",
             "runs/video/adapter": video_run.folder / "runs/video/adapter",
             "runs/speech/adapter": speech_run.folder / "runs/speech/adapter"}
    for link, target in links.items():
        (tmp_path / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp_path / link)
    with working_folder(tmp_path):
        rows = demo._evaluate(demo._demo_media(), demo._composed(), quick=False, log=io.StringIO())
    print("\n" + demo._table(rows))
    for row in rows:
        name, alone = demo._headline(row["alone"])
        composed, chat = (float(row[mode]["metrics"][name]) for mode in demo.MODES[1:])
        assert all(row[mode]["n"] == 128 for mode in demo.MODES)
        assert composed == pytest.approx(alone, abs=1e-9), (row["modality"], name, alone, composed)
        assert abs(chat - alone) <= 0.02, (row["modality"], name, alone, chat)
