"""Collator: chat prompts with placeholders, labels on assistant turns only, truncation around media."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorium.data.collate import ChatCollator
from sensorium.data.synthetic import (
    DIGITS,
    FRENCH,
    MOVING_QUESTIONS,
    SHAPES_QUESTIONS,
    SPEECH_QUESTIONS,
    WORDS,
    earlier_turns,
)
from tests.test_compose import word_tokenizer

PH = 512


def _collator(**kw) -> ChatCollator:
    tok = word_tokenizer()
    tok.placeholder_base = PH
    return ChatCollator(tok, {"image": PH}, **kw)


def test_caption_sample_labels_only_the_answer():
    c = _collator(tokens_per_item={"image": 3}, prompt="what is this ?")
    b = c([{"text": "a red circle .", "media": {"image": [torch.zeros(3, 2, 2)]}, "__key__": "k"}])
    tok = c.tokenizer
    ids, labels = b.tokens[0].tolist(), b.labels[0].tolist()
    assert ids.count(PH) == 3 and all(y == -100 for i, y in zip(ids, labels, strict=True) if i == PH)
    answer = [y for y in labels if y != -100]
    assert answer == tok.encode("a red circle .") + [2] + tok.encode("\n")  # words and end-of-turn token
    assert b.media["image"]["counts"].tolist() == [1]


def test_multi_turn_messages_label_every_assistant_turn():
    c = _collator()
    sample = {"messages": [
        {"role": "user", "content": "<|image|> what is this ?"}, {"role": "assistant", "content": "a circle ."},
        {"role": "user", "content": "red ?"}, {"role": "assistant", "content": "w1 ."},
    ], "media": {"image": [torch.zeros(3, 2, 2)]}}
    b = c([sample])
    labelled = [y for y in b.labels[0].tolist() if y != -100]
    tok = c.tokenizer
    assert labelled == tok.encode("a circle .") + [2] + tok.encode("\n") + tok.encode("w1 .") + [2] + tok.encode("\n")


def test_context_turns_come_first_and_only_the_samples_answer_is_trained_on():
    c = _collator(tokens_per_item={"image": 1}, prompt="what is this ?", context_turns=1.0)
    sample = {"text": "a red circle .", "media": {"image": [torch.zeros(3, 2, 2)]}, "__key__": "k7"}
    plain, msgs = c.messages(sample), c.messages(sample, context=True)
    assert msgs[0] == {"role": "system", "content": ""} and msgs[-2:] == plain[-2:] and len(plain) == 3
    earlier = msgs[1:-2]
    assert len(earlier) in (2, 4) and [m["role"] for m in earlier] == ["user", "assistant"] * (len(earlier) // 2)
    assert all(m["loss"] is False for m in earlier[1::2]) and c.messages(sample, context=True) == msgs  # fixed per key
    with_context, without = c([sample]), _collator(tokens_per_item={"image": 1}, prompt="what is this ?")([sample])
    assert with_context.tokens.shape[1] > without.tokens.shape[1]
    assert [y for y in with_context.labels[0].tolist() if y != -100] == [y for y in without.labels[0].tolist() if y != -100]


def test_earlier_turns_are_about_the_other_modalities():
    def asked(questions):
        return {q for forms in questions.values() for q in forms}

    image_only = asked(SHAPES_QUESTIONS) - asked(MOVING_QUESTIONS)
    video_only, speech = asked(MOVING_QUESTIONS) - asked(SHAPES_QUESTIONS), asked(SPEECH_QUESTIONS)
    c = _collator(context_turns=1.0)  # an image collator: earlier turns about clips and speech
    assert c.earlier_kinds == ("video", "speech")
    earlier = [c.messages({"text": "a .", "__key__": f"k{i}"}, context=True)[1:-2] for i in range(200)]
    questions = [m["content"] for turns in earlier for m in turns if m["role"] == "user"]
    assert not image_only & set(questions) and video_only & set(questions) and speech & set(questions)
    turns = [earlier_turns(np.random.default_rng(i), ("speech",)) for i in range(50)]
    answers = [m["content"] for t in turns for m in t[1::2]]
    assert all(m["content"] in speech for t in turns for m in t[0::2])
    assert all(set(a.split()) <= set(DIGITS) | set(WORDS) | set(FRENCH.values()) for a in answers)
    with pytest.raises(ValueError, match="image, video or speech"):
        earlier_turns(np.random.default_rng(0), ("text",))


def test_context_turns_are_drawn_per_batch():
    half = _collator(context_turns=0.5)
    batches = [[{"text": "a .", "__key__": f"k{i}-{j}"} for j in range(4)] for i in range(300)]
    lengths = [half(b).tokens.shape for b in batches]
    plain = [_collator()(b).tokens.shape for b in batches]
    longer = [n != p for n, p in zip(lengths, plain, strict=True)]
    assert 0.4 < sum(longer) / len(longer) < 0.6
    with pytest.raises(ValueError, match="context_turns is a share in"):
        _collator(context_turns=1.5)


def test_the_chats_of_a_batch_share_their_earlier_turns():
    from sensorium.compose import shared_prefix_length

    c = _collator(tokens_per_item={"image": 2}, prompt="what is this ?", context_turns=1.0)
    samples = [{"text": f"a w{j} .", "media": {"image": [torch.zeros(3, 2, 2)]}, "__key__": f"k{j}"} for j in range(6)]
    assert len({str(c.earlier_turns(s)) for s in samples}) > 1  # each key alone would draw other turns
    b, turns = c(samples), c.earlier_turns(samples[0])
    for i, s in enumerate(samples):  # every chat has the first sample's earlier turns
        ids, labels, _ = c.encode(s, context=turns)
        assert b.tokens[i, : len(ids)].tolist() == ids and b.labels[i, : len(ids)].tolist() == labels
    words = len(c.tokenizer.encode(" ".join(m["content"] for m in turns)))
    assert shared_prefix_length(b.tokens, b.labels, [PH]) > words  # all of them computed once


def test_bad_samples_are_skipped_and_reported():
    c = _collator()
    b = c([{"__bad__": "broken jpg", "__key__": "x", "__url__": "s.tar"},
           {"text": "a .", "media": {"image": [torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)]},
            "messages": [{"role": "user", "content": "<|image|> w1"}, {"role": "assistant", "content": "a"}]}])
    assert len(b) == 0 and [r[1] for r in b.bad] == ["x", "?"]
    assert "2 image items but 1 placeholders" in b.bad[1][2]


@settings(max_examples=60, deadline=None)
@given(n_items=st.integers(0, 3), per_item=st.integers(1, 6), max_len=st.integers(4, 40),
       words=st.lists(st.sampled_from(["red", "blue", "circle", "w3", "w7", "."]), min_size=1, max_size=12))
def test_truncation_never_cuts_a_media_span(n_items, per_item, max_len, words):
    c = _collator(tokens_per_item={"image": per_item}, max_len=max_len, prompt="what ?")
    sample = {"text": " ".join(words), "media": {"image": [torch.full((1,), float(i)) for i in range(n_items)]}}
    b = c([sample])
    ids = b.tokens[0].tolist()
    real = ids[: max(i for i, t in enumerate(ids) if t != 0) + 1] if any(t != 0 for t in ids) else []
    assert len(b.tokens[0]) <= max_len
    n_ph = real.count(PH)
    kept = int(b.media["image"]["counts"][0]) if "image" in b.media else 0
    assert n_ph == kept * per_item  # whole spans only, each with its item
    if kept:
        kept_items = b.media["image"]["inputs"]
        assert [int(x[0]) for x in kept_items] == list(range(kept))  # the first items, in order
    assert all(y == -100 or y < PH for y in b.labels[0].tolist())
