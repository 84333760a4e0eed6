"""sensorium eval: recipes of every task on a tiny backbone with random adapters; outputs, bad samples, errors."""

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import sensorium
from sensorium.adapters import save_adapter
from sensorium.adapters.cross_attention import (
    CrossAttentionAdapter,
    CrossAttentionConfig,
    VideoCrossAttentionAdapter,
)
from sensorium.adapters.perceiver import PerceiverConfig
from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from sensorium.backbone import load_backbone, load_tokenizer
from sensorium.cli import main
from sensorium.compose import ComposedModel
from sensorium.data.synthetic import encode_flac, encode_mp4, make_dataset, render_moving_clip, write_shards
from sensorium.encoders import ImageEncoderSpec
from sensorium.encoders.speech import SAMPLE_RATE, SpeechEncoder, SpeechEncoderSpec
from sensorium.encoders.video import VideoEncoder, VideoEncoderSpec
from sensorium.eval.report import format_value, render_report
from sensorium.eval.runner import SPEECH_PROMPTS, EvalConfig, EvalConfigError, evaluate, resolve_prompt
from tests.tiny import randomise, tiny_encoder
from tests.training.test_image_training import tiny_backbone_folder

IMAGE_GOOD = 5  # good shapes samples in the evaluated shard (2 bad ones sit between them)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def _recipe(root: Path, name: str, **values) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


def _wave(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny backbone folder, random image/video/speech adapter folders and small shard sets of each modality."""
    root = tmp_path_factory.mktemp("eval")
    backbone = tiny_backbone_folder(root / "backbone")
    bb = load_backbone(backbone)
    image_enc = tiny_encoder()
    image = CrossAttentionAdapter(CrossAttentionConfig.for_backbone(bb.config, image_enc.out_dim, every=1))
    save_adapter(randomise(image, 2), root / "image-adapter", backbone=bb, encoder=image_enc,
                 prompt={"system": "", "instruction": "Describe the image."})
    torch.manual_seed(1)
    video_enc = VideoEncoder(VideoEncoderSpec(image=ImageEncoderSpec(name="resnet10t", image_size=32), num_frames=4))
    video = VideoCrossAttentionAdapter(
        CrossAttentionConfig.for_backbone(bb.config, 32, layers=[0, 1]),
        PerceiverConfig(media_dim=video_enc.out_dim, dim=32, num_latents=4, num_frames=4, group=2, depth=1, n_heads=4),
    )
    save_adapter(randomise(video, 3), root / "video-adapter", backbone=bb, encoder=video_enc,
                 prompt={"system": "", "instruction": "Describe the video."})
    torch.manual_seed(0)
    speech_enc = SpeechEncoder(SpeechEncoderSpec(dim=32, num_layers=1, num_heads=4, ffn_dim=64, kernel_size=7))
    speech = SpeechAdapter(SpeechAdapterConfig.for_backbone(bb.config, 32, hidden=32, n_heads=4))
    save_adapter(randomise(speech, 4), root / "speech-adapter", backbone=bb, encoder=speech_enc,
                 prompt={"system": "", "instruction": "Repeat after me in English:"})

    # shapes: the first good test samples of a generated set, with a corrupt image and an image-less sample among them
    shapes = make_dataset("shapes", root / "shapes", num=4, seed=0)
    good = _members(next((shapes / "test").glob("*.tar")))[: 2 * IMAGE_GOOD]  # (.jpg, .json) pairs
    caption = json.dumps({"text": "a red circle"}).encode()
    bad = [("bad-corrupt.jpg", good[0][1][:200]), ("bad-corrupt.json", caption), ("bad-noimage.json", caption)]
    _write_tar(root / "shapes_eval/test/shard-000000.tar", good[:4] + bad + good[4:])

    # moving shapes: three clips
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(3):
        frames, attrs = render_moving_clip(rng, size=64, frames=8)
        clips.append({"mp4": encode_mp4(frames), "json": {"text": f"a {attrs['colour']} {attrs['shape']} moving "
                                                                  f"{attrs['direction']}", "attributes": attrs}})
    write_shards(iter(clips), root / "moving/test", total=len(clips))

    # spoken words: sine "utterances" of different lengths, a silent one (bad) and one without a translation
    utterances = [
        {"flac": encode_flac(_wave(0.6 + 0.3 * i, 200 + 60 * i)),
         "json": {"text": text, "translation": {"fr": fr}}}
        for i, (text, fr) in enumerate([("three one four", "trois un quatre"), ("red cat", "rouge chat"),
                                        ("one two", "un deux"), ("blue dog book", "bleu chien livre")])
    ]
    utterances.insert(2, {"flac": encode_flac(np.zeros(SAMPLE_RATE, dtype=np.float32)), "json": {"text": "one"}})
    utterances.append({"flac": encode_flac(_wave(0.8, 300)), "json": {"text": "nine"}})
    write_shards(iter(utterances), root / "spoken/test", total=len(utterances))
    return {"root": root, "backbone": backbone}


def _config(setup, name: str, **values) -> Path:
    root = setup["root"]
    base = {"backbone": str(setup["backbone"]), "out": str(root / "out" / name), "batch_size": 3, "max_new_tokens": 5}
    return _recipe(root, name, **{**base, **values})


def _outputs(out: Path) -> tuple[dict, list[dict], str]:
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, (out / "report.html").read_text()


def _check_report(html: str, metrics: dict, cards: int) -> None:
    assert html.count("<img ") == cards == html.count("src='data:image/png;base64,")
    for name, value in metrics["metrics"].items():
        assert f"<td>{name}</td><td class='v'>{format_value(value)}</td>" in html, name
    for row_class in ("correct", "partial", "wrong"):
        assert f"show('{row_class}')" in html


def test_image_caption_writes_metrics_predictions_and_report(setup, capsys):
    root = setup["root"]
    config = _config(setup, "image", task="image_caption", adapters=[str(root / "image-adapter")],
                     data=str(root / "shapes_eval"))
    assert main(["eval", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    metrics, rows, html = _outputs(root / "out/image")
    assert {"task", "metrics", "n", "skipped", "adapters", "timings"} <= set(metrics)
    assert metrics["task"] == "image_caption" and metrics["n"] == IMAGE_GOOD and metrics["skipped"] == 2
    assert metrics["adapters"] == [str(root / "image-adapter")] and metrics["timings"]["total_s"] > 0
    assert set(metrics["metrics"]) == {"cider_d", "bleu4", "colour_accuracy", "shape_accuracy", "size_accuracy",
                                       "position_accuracy", "colour_and_shape_accuracy", "exact_match"}
    reasons = {s["key"]: s["reason"] for s in metrics["skipped_samples"]}
    assert "not a readable image" in reasons["bad-corrupt"] and "no image field" in reasons["bad-noimage"]
    assert len(rows) == IMAGE_GOOD and all(r["prompt"] == "Describe the image." for r in rows)
    assert all(set(r) >= {"key", "reference", "prediction", "score", "correct", "attributes"} for r in rows)
    _check_report(html, metrics, IMAGE_GOOD)
    assert "bad-corrupt" in html and "skipped (2)" in html
    assert "cider_d" in out and format_value(metrics["metrics"]["bleu4"]) in out and "report.html" in out


def _image_model_and_chats(setup) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """The composed image model and, per test-split key, the one-turn chat asking it to describe that image."""
    root = setup["root"]
    model = sensorium.compose(load_backbone(setup["backbone"]), [root / "image-adapter"],
                              tokenizer=load_tokenizer(setup["backbone"]))
    chats = {n[: -len(".jpg")]: [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(d))},
                                                               {"type": "text", "text": "Describe the image."}]}]
             for n, d in _members(root / "shapes_eval/test/shard-000000.tar")
             if n.endswith(".jpg") and not n.startswith("bad")}
    return model, chats


def test_image_prompts_items_and_answers_equal_those_of_generate(setup, monkeypatch):
    """The batched run builds the same prompt ids and media items, and gets the same answers, as
    ComposedModel.generate on each image alone with the manifest's instruction (random image features barely
    differ between images, so the ids and items are compared, not only the answers)."""
    root = setup["root"]
    calls = []
    original = ComposedModel.generate_ids

    def spy(self, prompts, media=None, **kwargs):
        calls.append(([list(p) for p in prompts], media["image"]["inputs"].clone()))
        return original(self, prompts, media, **kwargs)

    monkeypatch.setattr(ComposedModel, "generate_ids", spy)
    config = EvalConfig.from_yaml(_config(setup, "image_spy", task="image_caption", data=str(root / "shapes_eval"),
                                          adapters=[str(root / "image-adapter")]))
    summary = evaluate(config, progress=False)
    assert len(calls) == 2  # batches of 3 and 2
    batched = [(p, x) for prompts, inputs in calls for p, x in zip(prompts, inputs, strict=True)]
    rows = [json.loads(line) for line in (root / "out/image_spy/predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == len(batched)
    calls.clear()
    model, chats = _image_model_and_chats(setup)
    for r, (prompt, item) in zip(rows, batched, strict=True):
        assert model.generate(chats[r["key"]], system="", max_new_tokens=5).strip() == r["prediction"]
        (alone, inputs), = calls[-1:]
        assert alone == [prompt]
        torch.testing.assert_close(inputs[0], item)


def test_contrastive_alpha_reaches_decoding(setup, monkeypatch):
    """``contrastive_alpha`` is the weight every batch decodes with, and each answer equals
    ``ComposedModel.generate`` with that weight; the run records it."""
    root = setup["root"]
    weights = []
    original = ComposedModel.generate_ids

    def spy(self, prompts, media=None, **kwargs):
        weights.append(kwargs.get("contrastive_alpha"))
        return original(self, prompts, media, **kwargs)

    monkeypatch.setattr(ComposedModel, "generate_ids", spy)
    config = EvalConfig.from_yaml(_config(setup, "image_cd", task="image_caption", data=str(root / "shapes_eval"),
                                          adapters=[str(root / "image-adapter")], contrastive_alpha=3))
    summary = evaluate(config, progress=False)
    assert weights == [3.0, 3.0] and summary["contrastive_alpha"] == 3.0  # batches of 3 and 2
    rows = [json.loads(line) for line in (root / "out/image_cd/predictions.jsonl").read_text().splitlines()]
    model, chats = _image_model_and_chats(setup)
    weights.clear()
    for r in rows:
        assert model.generate(chats[r["key"]], system="", max_new_tokens=5, contrastive_alpha=3.0).strip() == r["prediction"]
    assert weights == [3.0] * len(rows)


def test_speech_tasks_score_wer_and_bleu(setup, capsys):
    root = setup["root"]
    adapters = [str(root / "speech-adapter")]
    assert main(["eval", "--config", str(_config(setup, "asr", task="asr", adapters=adapters,
                                                 data=str(root / "spoken")))]) == 0
    metrics, rows, html = _outputs(root / "out/asr")
    assert set(metrics["metrics"]) == {"wer", "exact_match"} and metrics["n"] == 5 and metrics["skipped"] == 1
    assert "silent" in metrics["skipped_samples"][0]["reason"]
    assert all(r["prompt"] == SPEECH_PROMPTS["asr"] for r in rows) and len(rows) == 5
    _check_report(html, metrics, 5)
    # utterances of different lengths batched (placeholders expanded per utterance) answer as they do alone
    model = sensorium.compose(load_backbone(setup["backbone"]), adapters, tokenizer=load_tokenizer(setup["backbone"]))
    audio = {n[: -len(".flac")]: d for n, d in _members(next((root / "spoken/test").glob("*.tar"))) if n.endswith(".flac")}
    for r in rows:
        chat = [{"role": "user", "content": [{"type": "audio", "audio": audio[r["key"]]},
                                             {"type": "text", "text": SPEECH_PROMPTS["asr"]}]}]
        assert model.generate(chat, system="", max_new_tokens=5).strip() == r["prediction"]

    assert main(["eval", "--config", str(_config(setup, "st", task="speech_translation", adapters=adapters,
                                                 data=str(root / "spoken" / "test")))]) == 0
    metrics, rows, html = _outputs(root / "out/st")
    assert set(metrics["metrics"]) == {"bleu", "exact_match"} and metrics["n"] == 4 and metrics["skipped"] == 2
    assert any("translation.fr" in s["reason"] for s in metrics["skipped_samples"])
    assert [r["reference"] for r in rows][:2] == ["trois un quatre", "rouge chat"]
    assert all(r["prompt"] == "Translate into French:" for r in rows)
    _check_report(html, metrics, 4)
    assert "bleu" in capsys.readouterr().out


def test_video_caption_and_qa(setup):
    root = setup["root"]
    adapters = [str(root / "video-adapter"), str(root / "image-adapter")]  # the image adapter is composed, unused
    assert main(["eval", "--config", str(_config(setup, "vcap", task="video_caption", adapters=adapters,
                                                 data=str(root / "moving")))]) == 0
    metrics, rows, html = _outputs(root / "out/vcap")
    assert {"cider_d", "bleu4", "colour_accuracy", "shape_accuracy", "direction_accuracy"} <= set(metrics["metrics"])
    assert metrics["n"] == 3 and all(r["prompt"] == "Describe the video." for r in rows)
    _check_report(html, metrics, 3)

    assert main(["eval", "--config", str(_config(setup, "vqa", task="video_qa", adapters=adapters[:1],
                                                 data=str(root / "moving"), questions=["direction", "colour"],
                                                 prompt="Answer with one word."))]) == 0
    metrics, rows, html = _outputs(root / "out/vqa")
    assert set(metrics["metrics"]) == {"accuracy", "mention_accuracy", "direction_accuracy", "colour_accuracy"}
    assert metrics["n"] == 6 and metrics["samples"] == 3 and len(rows) == 6
    assert rows[0]["prompt"] == "Which way does it move? Answer with one word."
    assert rows[0]["reference"] == rows[0]["attributes"]["direction"] and rows[1]["question"] == "colour"
    _check_report(html, metrics, 3)  # one card (one strip of frames) per clip, its two questions inside


def _context_media(root: Path) -> tuple[Path, Path]:
    """A clip and an utterance of the test sets, written as files for a recipe's context."""
    clip, wav = root / "context-clip.mp4", root / "context-speech.flac"
    clip.write_bytes(next(d for n, d in _members(next((root / "moving/test").glob("*.tar"))) if n.endswith(".mp4")))
    wav.write_bytes(next(d for n, d in _members(next((root / "spoken/test").glob("*.tar"))) if n.endswith(".flac")))
    return clip, wav


def test_questions_asked_after_context_turns_answer_as_generate_does_in_that_chat(setup):
    """With ``context``, every image question follows a clip turn and a speech turn (their media encoded once);
    each answer equals ComposedModel.generate on the whole conversation."""
    root = setup["root"]
    media_counts = []
    original = ComposedModel.generate_ids

    def spy(self, prompts, media=None, **kwargs):
        media_counts.append({m: list(e["counts"]) for m, e in media.items()})
        return original(self, prompts, media, **kwargs)

    clip, wav = _context_media(root)
    adapters = [str(root / f"{m}-adapter") for m in ("image", "video", "speech")]
    context = [
        {"role": "user", "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "Describe the video."}]},
        {"role": "assistant", "content": "a red circle moving up"},
        {"role": "user", "content": [{"type": "audio", "audio": str(wav)}, {"type": "text", "text": "Repeat after me:"}]},
        {"role": "assistant", "content": "three one four"},
    ]
    config = EvalConfig.from_yaml(_config(setup, "image_in_chat", task="image_caption", adapters=adapters,
                                          data=str(root / "shapes_eval"), context=context))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ComposedModel, "generate_ids", spy)
        summary = evaluate(config, progress=False)
    metrics, rows, html = _outputs(root / "out/image_in_chat")
    assert metrics["context"] == context and summary["n"] == IMAGE_GOOD == len(rows)
    assert "each question follows these turns" in html and f"[video: {clip}]" in html
    model = sensorium.compose(load_backbone(setup["backbone"]), adapters, tokenizer=load_tokenizer(setup["backbone"]))
    images = {n[: -len(".jpg")]: Image.open(io.BytesIO(d)) for n, d in _members(root / "shapes_eval/test/shard-000000.tar")
              if n.endswith(".jpg") and not n.startswith("bad")}
    for r in rows:
        chat = [*context, {"role": "user", "content": [{"type": "image", "image": images[r["key"]]},
                                                        {"type": "text", "text": "Describe the image."}]}]
        assert model.generate(chat, system="", max_new_tokens=5).strip() == r["prediction"]
    # not vacuous: the batched run did put the clip and the utterance before every image
    assert [counts for counts in media_counts] == [{"video": [1] * 3, "speech": [1] * 3, "image": [1] * 3},
                                                   {"video": [1] * 2, "speech": [1] * 2, "image": [1] * 2}]


def test_a_composed_model_can_be_reused_across_evaluations(setup):
    root = setup["root"]
    adapters = [str(root / "image-adapter"), str(root / "speech-adapter")]
    model = sensorium.compose(load_backbone(setup["backbone"]), adapters, tokenizer=load_tokenizer(setup["backbone"]))
    runs = {}
    for name, given in (("loaded", None), ("reused", model)):
        config = EvalConfig.from_yaml(_config(setup, f"image_{name}", task="image_caption", adapters=adapters,
                                              data=str(root / "shapes_eval")))
        runs[name] = evaluate(config, progress=False, model=given)
        assert evaluate(EvalConfig.from_yaml(_config(setup, f"asr_{name}", task="asr", adapters=adapters,
                                                     data=str(root / "spoken"))), progress=False, model=given)["n"] == 5
    assert runs["loaded"]["metrics"] == runs["reused"]["metrics"] and runs["reused"]["n"] == IMAGE_GOOD
    loaded, reused = ((root / f"out/image_{n}/predictions.jsonl").read_text() for n in ("loaded", "reused"))
    assert loaded == reused
    with pytest.raises(EvalConfigError, match="the model given composes image, speech; the recipe's adapters are image"):
        evaluate(EvalConfig.from_yaml(_config(setup, "image_other", task="image_caption", adapters=adapters[:1],
                                              data=str(root / "shapes_eval"))), progress=False, model=model)


def test_cli_overrides_out_and_max_samples(setup):
    root = setup["root"]
    config = _config(setup, "image_small", task="image_caption", adapters=[str(root / "image-adapter")],
                     data=str(root / "shapes_eval"))
    assert main(["eval", "--config", str(config), "--max-samples", "3", "--out", str(root / "out/small")]) == 0
    metrics, rows, html = _outputs(root / "out/small")
    # the first three samples of the shard: two images, then the corrupt one (skipped samples count too)
    assert metrics["n"] == 2 and metrics["skipped"] == 1 and len(rows) == 2 and html.count("<img ") == 2
    assert not (root / "out/image_small").exists()


@pytest.mark.parametrize("change, message", [
    ({"task": "captioning"}, "unknown task 'captioning' (known: image_caption, video_caption, video_qa, asr, "
                             "speech_translation)"),
    ({"adapters": ["{root}/nowhere"]}, "{root}/nowhere: no such adapter folder"),
    ({"batchsize": 4}, "unknown key 'batchsize'; did you mean 'batch_size'?"),
    ({"batch_size": "four"}, "batch_size must be an integer, got 'four'"),
    ({"max_samples": 0}, "max_samples must be a positive integer, got 0"),
    ({"task": "asr"}, "task asr needs a speech adapter; adapters: {root}/image-adapter (image)"),
    ({"data": "{root}/shapes_gone"}, "{root}/shapes_gone: no such data folder"),
    ({"context": [{"role": "user", "content": [{"type": "video", "video": "{root}/moving/test"}]}]},
     "context[0]: {root}/moving/test: no such file"),
    ({"context": [{"role": "user", "content": [{"type": "audio", "audio": "{root}/shapes_eval/test/shard-000000.tar"}]}]},
     "context[0]: {root}/shapes_eval/test/shard-000000.tar is speech media, but no speech adapter is among the "
     "recipe's adapters"),
    ({"context": [{"role": "robot", "content": "hi"}]}, "context[0]: a context message is {role: user | assistant"),
    ({"context": [{"role": "user", "content": [{"type": "smell", "smell": "x"}]}]},
     "context[0]: a part is {type: text | image | video | audio"),
    ({"media_scope": "latest"}, "media_scope must be one of current, until_other, all, got 'latest'"),
    ({"contrastive_alpha": -1}, "contrastive_alpha must be a finite number >= 0, got -1.0"),
    ({"contrastive_alpha": "strong"}, "contrastive_alpha must be a number, got 'strong'"),
    ({"data": "{root}/shapes"}, None),  # fine: the generated set's test split (not run: see below)
])
def test_input_errors_are_one_line(setup, capsys, change, message):
    root = setup["root"]
    values = {"task": "image_caption", "adapters": [str(root / "image-adapter")], "data": str(root / "shapes_eval"),
              "backbone": str(setup["backbone"])}
    values.update({k: json.loads(json.dumps(v).replace("{root}", str(root))) for k, v in change.items()})
    if message is None:
        assert EvalConfig.from_dict(values).data == str(root / "shapes")
        return
    rc = main(["eval", "--config", str(_recipe(root, "bad", **values))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sensorium: error: ") and message.replace("{root}", str(root)) in err, err


def test_missing_recipe_and_missing_keys(tmp_path):
    with pytest.raises(EvalConfigError, match="no such evaluation recipe"):
        EvalConfig.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "r.yaml").write_text("task: asr\n")
    with pytest.raises(EvalConfigError, match=r"missing required key\(s\) adapters, data"):
        EvalConfig.from_yaml(tmp_path / "r.yaml")
    with pytest.raises(EvalConfigError, match="questions apply to the video_qa task only"):
        EvalConfig(task="asr", adapters=["a"], data="d", questions=["colour"])


def test_prompt_defaults():
    """Captions use the adapter's recorded instruction; speech tasks their standard prompt whatever was recorded."""
    from sensorium.training.speech import TASK_PROMPTS

    assert SPEECH_PROMPTS == {"asr": TASK_PROMPTS["asr"], "speech_translation": TASK_PROMPTS["translate"]}
    manifest = {"prompt": {"system": "Be brief.", "instruction": "Repeat after me in English:"}}
    asr = EvalConfig(task="speech_translation", adapters=["a"], data="d")
    assert resolve_prompt(asr, manifest) == ("Translate into French:", "Be brief.")
    cap = EvalConfig(task="image_caption", adapters=["a"], data="d", system="")
    assert resolve_prompt(cap, {"prompt": {"instruction": "What is this?"}}) == ("What is this?", "")
    assert resolve_prompt(cap, {}) == ("Describe the image.", "")
    qa = EvalConfig(task="video_qa", adapters=["a"], data="d")
    assert resolve_prompt(qa, manifest)[0] == ""  # the bare question, as the instruction sets ask it


def test_report_limits_its_gallery_and_escapes_text():
    summary = {"task": "asr", "metrics": {"wer": 0.25}, "n": 2, "skipped": 0, "timings": {"total_s": 1.0}}
    rows = [{"sample": i, "key": f"k{i}", "prompt": "<b>p</b>", "reference": "a", "prediction": "a", "score": 1.0}
            for i in range(2)]
    html = render_report(summary, rows, {0: None, 1: None}, limit=1)
    assert html.count("<img ") == 1 and "showing the first 1 of 2 samples" in html
    assert "&lt;b&gt;p&lt;/b&gt;" in html and "<b>p</b>" not in html and "0.250" in html
