"""BLEU-4 by hand and against sacreBLEU; speech-translation BLEU on a known value."""

import math

import pytest
import sacrebleu

from sensorium.eval import bleu4, translation_bleu
from sensorium.eval.text import normalize_text


def test_bleu4_hand_worked_corpus():
    predictions = ["A cat sat on the mat.", "dogs run"]
    references = [["the cat sat on the mat", "a cat is on the mat"], ["dogs run very fast", "the dogs run"]]
    # Sentence 1 (6 words): unigrams 6/6 and bigrams 5/5 match some reference; trigrams: "a cat sat" is
    # in neither, "cat sat on", "sat on the", "on the mat" are -> 3/4; 4-grams: "cat sat on the",
    # "sat on the mat" -> 2/3. Both references have 6 words -> reference length 6.
    # Sentence 2 (2 words): unigrams 2/2, bigram "dogs run" 1/1, no longer n-grams; the closest
    # reference length is 3 ("the dogs run").
    # Corpus: p1 = 8/8, p2 = 6/6, p3 = 3/4, p4 = 2/3; c = 8, r = 9 -> BP = exp(1 - 9/8).
    # BLEU = exp(-1/8) * (1 * 1 * 3/4 * 2/3) ** (1/4) = exp(-1/8) * 2 ** (-1/4) ≈ 0.742088.
    expected = 100 * math.exp(-1 / 8) * 2 ** (-1 / 4)
    assert bleu4(predictions, references) == pytest.approx(expected)
    assert expected == pytest.approx(74.2088, abs=1e-4)


def test_bleu4_agrees_with_sacrebleu_on_normalised_text():
    predictions = [
        "a man rides a red bike down the street",
        "two dogs play in the snow together",
        "a plate of rice and beans",
        "a woman holds an umbrella",
        "a small child eats a slice of pizza",  # 8 words: references of 7 and 9 tie, the shorter wins
    ]
    references = [
        ["a man riding a red bicycle down the street", "a person rides a bike on the road"],
        ["two dogs are playing in the snow", "a pair of dogs play together in snow"],
        ["a plate with rice beans and meat", "a dish of food with rice and black beans on it"],
        ["a woman holding an umbrella in the rain", "the woman walks in the rain"],
        ["a child eats a slice of pizza", "a small child is eating a slice of pizza"],
    ]
    refs = [[normalize_text(r) for r in rs] for rs in references]
    streams = [list(s) for s in zip(*refs, strict=True)]
    ours = bleu4(predictions, references)
    theirs = sacrebleu.corpus_bleu(predictions, streams, tokenize="none", smooth_method="none")
    assert 0 < ours < 100 and theirs.bp < 1  # short candidates: the brevity penalty and the tie count
    assert ours == pytest.approx(theirs.score, abs=1e-9)


def test_bleu4_is_zero_without_a_four_gram_match():
    assert bleu4(["a red circle on the left"], [["a red circle at the left"]]) == 0.0


def test_translation_bleu_known_value():
    # 13a splits off the final period: hypothesis "The cat sat on the mat ." (7 tokens), reference
    # "The cat sat on the red mat ." (8 tokens). Matches: 1-grams 7/7; 2-grams 5/6 (not "the mat");
    # 3-grams 3/5 ("The cat sat", "cat sat on", "sat on the"); 4-grams 2/4 ("The cat sat on",
    # "cat sat on the"). BP = exp(1 - 8/7).
    # BLEU = exp(-1/7) * (5/6 * 3/5 * 1/2) ** (1/4) = exp(-1/7) / sqrt(2) ≈ 61.2975.
    score = translation_bleu(["The cat sat on the mat."], ["The cat sat on the red mat."])
    assert score == pytest.approx(100 * math.exp(-1 / 7) / math.sqrt(2))


def test_translation_bleu_takes_a_varying_number_of_references():
    predictions = ["The cat sat on the mat.", "Hello there."]
    references = [["The cat sat on the red mat.", "The cat sat on the mat."], "Hello there."]
    assert translation_bleu(predictions, references) == pytest.approx(100.0)
