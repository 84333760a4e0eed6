"""The three recipes' adapters composed on one backbone: each modality's score in a conversation stays within
2 points of its adapter used alone.

Slow (about 5 minutes on 2 CPU cores, on the adapters the image, video and speech recipe tests train): each
modality is evaluated with the demo's evaluation on 256 held-out samples with its adapter alone, and with
the three adapters composed, every question asked after an image, clip or speech turn of the two other
modalities (the demo's ``in a chat``: their first test item and its reference as the answer), with the
default media scope (``current``: the earlier turns read as text). The composed model, asked without
earlier turns, must also answer the first 32 samples word for word as the adapter alone (each adapter sees
only its own media). It runs where the video and speech recipes run (their fixtures skip on machines below
the speed their clock-bounded bars were measured at).
"""

import json
from pathlib import Path

import pytest

import sensorium
from sensorium.demo import EVALS, chat_context, demo_media
from sensorium.eval.runner import EvalConfig, evaluate

SAMPLES = 256
SAME_ANSWERS = 32  # composed == alone is exact, so a few batches show it
METRICS = {  # modality → the scores compared (the demo's headline first) and whether higher is better
    "image": (("colour_and_shape_accuracy",), True),
    "video": (("direction_accuracy", "colour_and_shape_accuracy"), True),
    "speech": (("wer",), False),
}


def _predictions(summary: dict) -> list[str]:
    lines = (Path(summary["out"]) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prediction"] for line in lines]


@pytest.mark.slow
def test_composed_adapters_answer_each_modality_in_a_chat_within_two_points(image_run, video_run, speech_run,
                                                                            tmp_path):
    runs = {"image": image_run, "video": video_run, "speech": speech_run}
    data = {m: runs[m].folder / folder for m, _, folder, _ in EVALS}
    adapters = {m: str(runs[m].folder / adapter) for m, _, _, adapter in EVALS}
    media = demo_media(data, tmp_path / "media")
    path = sensorium.embedded_backbone_path()
    composed = sensorium.compose(sensorium.load_backbone(path), list(adapters.values()),
                                 tokenizer=sensorium.load_tokenizer(path))
    failures = []
    every = list(adapters.values())
    for modality, task, _, _ in EVALS:
        def run(name, adapter_folders, samples, model=None, context=None, task=task, modality=modality):
            config = EvalConfig(task=task, adapters=adapter_folders, data=str(data[modality]), max_samples=samples,
                                out=str(tmp_path / f"{modality}_{name}"), context=context)
            return evaluate(config, progress=False, model=model)

        alone = run("alone", [adapters[modality]], SAMPLES)
        chat = run("chat", every, SAMPLES, composed, chat_context(modality, media))
        same = run("composed", every, SAME_ANSWERS, composed)
        assert alone["n"] >= SAMPLES and chat["n"] == alone["n"]
        assert _predictions(same) == _predictions(alone)[:same["n"]], modality
        names, higher = METRICS[modality]
        for name in names:
            a, c = alone["metrics"][name], chat["metrics"][name]
            print(f"{modality} {name}: alone {a:.4f}, in a chat {c:.4f}")
            if (a - c if higher else c - a) > 0.02:
                failures.append(f"{modality} {name}: alone {a:.4f}, in a chat {c:.4f}")
    assert not failures, failures
