"""LIMA-style instruction sets: chats consistent with their media, labels on answers only, a short
instruction-tuning run that continues a trained image adapter."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from sensorium.backbone import Llama, LlamaConfig
from sensorium.backbone.tokenizer import Tokenizer
from sensorium.cli import main
from sensorium.data import synthetic
from sensorium.data.collate import PLACEHOLDER_OF, ChatCollator
from sensorium.data.shards import parse_json_field
from sensorium.data.synthetic import (
    CHECK_QUESTIONS,
    DIGITS,
    FOLLOW_UPS,
    GENERATORS,
    MOVING_QUESTIONS,
    POSITION_PHRASES,
    SHAPES_QUESTIONS,
    SPEECH_QUESTIONS,
    french_translation,
    instruction_chat,
    moving_caption,
    shapes_caption,
)
from tests.training.test_image_training import WORDS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SETS = {  # name → (modality, media field, question forms)
    "shapes-instruct": ("image", "jpg", SHAPES_QUESTIONS),
    "moving-shapes-instruct": ("video", "mp4", MOVING_QUESTIONS),
    "spoken-words-instruct": ("speech", "flac", SPEECH_QUESTIONS),
}


def _expected(name: str, j: dict) -> dict[str, str]:
    """The right answer to each topic, worked out here from the sample's attributes and texts."""
    a = j["attributes"]
    if name == "shapes-instruct":
        return {"colour": a["colour"], "shape": a["shape"], "size": a["size"],
                "position": POSITION_PHRASES[a["position"]], "caption": shapes_caption(a)}
    if name == "moving-shapes-instruct":
        return {"colour": a["colour"], "shape": a["shape"], "direction": a["direction"], "caption": moving_caption(a)}
    words = j["text"].split()
    assert a["kind"] == ("digits" if all(w in DIGITS for w in words) else "words")
    return {"transcript": j["text"], "translation": french_translation(words), "count": DIGITS[len(words)],
            "first": words[0], "last": words[-1], "kind": a["kind"]}


@pytest.fixture(scope="module", params=list(SETS))
def generated(request):
    name = request.param
    if name == "spoken-words-instruct":
        pytest.importorskip("espeakng_loader", reason="pip install --no-deps espeakng-loader")
    return name, list(GENERATORS[name](8, np.random.default_rng(0)))


def test_chats_hold_one_placeholder_and_answers_that_match_the_media(generated):
    name, samples = generated
    modality, field, questions = SETS[name]
    assert len(samples) == 8
    for s in samples:
        assert set(s) == {field, "json"} and s[field]
        j = parse_json_field(json.dumps(s["json"]).encode(), name)  # what the training pipeline reads
        msgs, asks = j["messages"], j["asks"]
        assert 1 <= len(asks) <= 3 and len(msgs) == 2 * len(asks)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * len(asks)
        first = msgs[0]["content"]
        assert first.startswith(PLACEHOLDER_OF[modality]) and len(first) > len(PLACEHOLDER_OF[modality])
        all_text = "".join(m["content"] for m in msgs)
        assert {p: all_text.count(p) for p in PLACEHOLDER_OF.values()} == {
            p: int(p == PLACEHOLDER_OF[modality]) for p in PLACEHOLDER_OF.values()}, msgs
        expected = _expected(name, j)
        for turn, (ask, q, ans) in enumerate(zip(asks, msgs[::2], msgs[1::2], strict=True)):
            question = q["content"].removeprefix(PLACEHOLDER_OF[modality]) if turn == 0 else q["content"]
            topic = ask["topic"]
            if "check" in ask:  # a yes/no question about one value
                assert question in [f.format(v=ask["check"]) for f in CHECK_QUESTIONS[topic]], question
                assert ans["content"] == ("yes" if ask["check"] == expected[topic] else "no"), (ask, expected)
            else:
                forms = questions[topic] + (FOLLOW_UPS[topic] if turn else ())
                assert question in forms, (topic, question)
                assert ans["content"] == expected[topic], (topic, ans, j["attributes"])
        if name == "spoken-words-instruct":
            assert j["task"] == {"transcript": "asr", "translation": "translate"}.get(asks[-1]["topic"], "qa")
        else:  # an answer about colour names the sample's colour and no other
            for ask, ans in zip(asks, msgs[1::2], strict=True):
                if ask["topic"] == "colour" and "check" not in ask:
                    assert [c for c in synthetic.COLOURS if c in ans["content"].split()] == [j["attributes"]["colour"]]
    # the same random stream gives the same chats and media (mp4 bytes are left out: x264's output once
    # differed between two encodes of the same frames in one test process)
    again = list(GENERATORS[name](8, np.random.default_rng(0)))
    assert [s["json"] for s in again] == [s["json"] for s in samples]
    if field != "mp4":
        assert [s[field] for s in again] == [s[field] for s in samples]


def test_question_forms_turn_counts_and_topics_are_all_used():
    """Over a thousand chats (no media: the chat alone) every form, topic and turn count shows up."""
    rng = np.random.default_rng(1)
    answers = {"colour": "red", "shape": "circle", "size": "small", "position": "on the left", "caption": "a"}
    checkable = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES), "size": ["small", "large"],
                 "position": list(POSITION_PHRASES.values())}
    weights = dict.fromkeys(answers, 1.0)
    seen, turns, checks, checkable_asks = set(), set(), 0, 0
    for _ in range(1000):
        msgs, asks = instruction_chat(rng, "<|image|>", answers, SHAPES_QUESTIONS, weights, checkable)
        turns.add(len(asks))
        assert len({a["topic"] for a in asks}) == len(asks), "a chat asks each topic once"
        checks += sum("check" in a for a in asks)
        checkable_asks += sum(a["topic"] in checkable for a in asks)
        seen |= {m["content"].removeprefix("<|image|>") for m in msgs[::2]}
    assert turns == {1, 2, 3}
    assert {q for forms in SHAPES_QUESTIONS.values() for q in forms} <= seen
    assert {q for t in answers for q in FOLLOW_UPS[t]} <= seen
    assert abs(checks / checkable_asks - synthetic.CHECK_PROBABILITY) < 0.05  # yes/no now and then


def test_instruction_sets_default_to_a_thousand_training_chats(monkeypatch, tmp_path):
    written = {}

    def fake_write(samples, folder, *, total, **kw):  # record the sizes; render nothing
        written[folder.name] = total
        folder.mkdir(parents=True)
        return []

    monkeypatch.setattr(synthetic, "write_shards", fake_write)
    for name in SETS:
        synthetic.make_dataset(name, tmp_path / name)
        assert written == {"train": 1000, "val": 128, "test": 256}, name
        assert synthetic.is_current(tmp_path / name, name) and not synthetic.is_current(tmp_path / name, "shapes")


def _word_tokenizer(samples: list[dict]) -> Tokenizer:
    """A word-level tokenizer whose vocabulary holds every word of the chats (no [UNK] anywhere)."""
    words = {w for s in samples for m in s["json"]["messages"] for w in m["content"].split("|>")[-1].split()}
    vocab = ["[UNK]", "<|im_start|>", "<|im_end|>", "[PAD]", "system", "user", "assistant", *sorted(words)]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, eos_ids=[2], chat_format="chatml")


def test_collator_labels_exactly_the_answers_and_keeps_one_media_item(generated):
    name, samples = generated
    modality = SETS[name][0]
    tok = _word_tokenizer(samples)
    ph = tok.placeholder_ids[PLACEHOLDER_OF[modality]]
    pad = 3
    collator = ChatCollator(tok, {modality: ph}, tokens_per_item={modality: 3}, max_len=512, pad_id=pad)
    batch = collator([{**s["json"], "media": {modality: [torch.zeros(2)]}, "__key__": str(i)}
                      for i, s in enumerate(samples)])
    assert len(batch) == 8 and not batch.bad
    assert batch.media[modality]["counts"].tolist() == [1] * 8  # one item, also in multi-turn chats
    im_end, unk = 2, 0
    for row, s in enumerate(samples):
        ids, labels = batch.tokens[row].tolist(), batch.labels[row].tolist()
        real = len(ids) - next((i for i, t in enumerate(reversed(ids)) if t != pad), 0)
        assert ids[:real].count(ph) == 3 and unk not in ids and all(t == pad for t in ids[real:])
        answers = [m["content"] for m in s["json"]["messages"] if m["role"] == "assistant"]
        expected = [t for a in answers for t in [*tok.encode(a), im_end]]
        assert [y for y in labels if y != -100] == expected  # every answer token and its end of turn, nothing else
        assert all(y == -100 or y == i for i, y in zip(ids, labels, strict=True))
    multi = [i for i, s in enumerate(samples) if len(s["json"]["asks"]) > 1]
    assert multi, "seed 0 gives multi-turn chats in every set"


def _tiny_backbone_folder(folder: Path) -> Path:
    """The tiny HF folder of tests/training/test_image_training.py (random ``tiny`` Llama, 64-word
    vocabulary), written from our own model: importing transformers would cost more than the runs."""
    config = LlamaConfig.from_name("tiny", vocab_size=64)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Llama(config).state_dict().items() if k != "lm_head.weight"}  # tied
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(state, folder / "model.safetensors")
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "<|im_start|>"}))
    return folder


def _losses(log_dir: Path) -> list[float]:
    (metrics,) = log_dir.rglob("metrics.csv")
    return [float(r["train/loss"]) for r in csv.DictReader(open(metrics)) if r.get("train/loss")]


def test_instruction_tuning_recipe_continues_a_trained_image_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes write runs/... relative to the working directory
    backbone = _tiny_backbone_folder(tmp_path / "backbone")
    common = ["--model.backbone", str(backbone), "--model.every", "1",
              "--model.encoder", json.dumps({"name": "resnet10t", "image_size": 32, "checkpoint": None}),
              "--data.num_train", "8", "--data.batch_size", "4", "--data.num_workers", "0",
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
              "--trainer.log_every_n_steps", "1"]
    base = tmp_path / "base_adapter"
    assert main(["fit", "--config", str(RECIPES / "image/shapes.yaml"), *common, "--model.adapter_dir", str(base),
                 "--data.root", str(tmp_path / "shapes")]) == 0
    assert main(["fit", "--config", str(RECIPES / "image/shapes_instruct.yaml"), *common,
                 "--model.init_adapter", str(base), "--data.root", str(tmp_path / "shapes_instruct")]) == 0
    # the recipe generated the instruction set through ShardDataModule's `synthetic:`
    assert json.loads((tmp_path / "shapes_instruct/info.json").read_text())["name"] == "shapes-instruct"
    out = tmp_path / "runs/image_instruct/adapter"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["init_adapter"] == str(base) and manifest["modality"] == "image"
    before, after = load_file(base / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert set(after) == set(before)
    diff = max(float((after[k] - before[k]).abs().max()) for k in before)
    # two warm-up steps of AdamW at lr <= 2e-5 move each weight by about that much: started from the base
    # adapter (a fresh one would differ by the init scale) and trained
    assert 0 < diff < 1e-3, diff
    losses = _losses(tmp_path / "runs/image_instruct/logs")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
