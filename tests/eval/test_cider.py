"""CIDEr-D against a corpus worked out by hand, and its defining properties."""

import math

import pytest

from sensorium.eval import cider_d, cider_d_scores

# Two images, two references each. Document frequencies over the reference sets: "a" is in both
# images' references, so df = 2 and idf = log(2) - log(2) = 0; every other n-gram is in exactly one
# image's references (df = 1), so its idf is L = log(2) - log(1) = log 2. A candidate n-gram absent
# from every reference set (df 0, counted as 1) would also get L.
PREDICTIONS = ["A cat sits.", "a dog"]
REFERENCES = [["a cat sits", "a cat sleeps"], ["a dog runs", "The dog runs!"]]


def test_hand_worked_corpus():
    # Image 1, candidate "a cat sits" (3 words).
    #  vs "a cat sits" (3 words, length penalty exp(0) = 1): the tf-idf vectors are identical.
    #   n=1: {a: 0, cat: L, sits: L} both sides -> cosine 1.  n=2: {a cat, cat sits} -> 1.
    #   n=3: {a cat sits} -> 1.  n=4: no 4-gram -> 0.   mean over n = 3/4.
    #  vs "a cat sleeps" (3 words, penalty 1):
    #   n=1: cand {a: 0, cat: L, sits: L}, ref {a: 0, cat: L, sleeps: L}: dot = min(L, L) * L = L^2,
    #        norms sqrt(2) L each -> 1/2.
    #   n=2: cand {a cat: L, cat sits: L}, ref {a cat: L, cat sleeps: L} -> 1/2.  n=3, n=4: 0.
    #   mean over n = 1/4.
    #  score = 10 * mean(3/4, 1/4) = 5.
    image_1 = 10 * (3 / 4 + 1 / 4) / 2
    # Image 2, candidate "a dog" (2 words); both references have 3 words: penalty exp(-1 / (2 * 6^2)).
    #  vs "a dog runs": n=1: cand {a: 0, dog: L} (norm L), ref {a: 0, dog: L, runs: L} (norm sqrt(2) L),
    #   dot L^2 -> 1/sqrt(2).  n=2: cand {a dog: L}, ref {a dog: L, dog runs: L} -> 1/sqrt(2).
    #   n=3, n=4: the candidate has none -> 0.   sum over n = sqrt(2).
    #  vs "the dog runs": n=1: ref {the: L, dog: L, runs: L} (norm sqrt(3) L), dot L^2 -> 1/sqrt(3).
    #   n=2: {a dog} vs {the dog, dog runs} -> 0.   sum over n = 1/sqrt(3).
    #  score = 10 * penalty * (sqrt(2) + 1/sqrt(3)) / 4 / 2 ≈ 2.455118.
    penalty = math.exp(-1 / 72)
    image_2 = 10 * penalty * (math.sqrt(2) + 1 / math.sqrt(3)) / 4 / 2
    assert cider_d_scores(PREDICTIONS, REFERENCES) == pytest.approx([image_1, image_2])
    assert image_2 == pytest.approx(2.455118, abs=1e-6)
    assert cider_d(PREDICTIONS, REFERENCES) == pytest.approx((image_1 + image_2) / 2)  # ≈ 3.727559


def test_candidate_counts_are_clipped_to_the_reference():
    # All n-grams are in one image's references only: idf L everywhere. Candidate "dog dog" vs "dog runs"
    # (equal lengths, penalty 1): n=1: cand {dog: 2L} (norm 2L), ref {dog: L, runs: L} (norm sqrt(2) L);
    # clipped dot = min(2L, L) * L = L^2 -> 1 / (2 sqrt(2)) (unclipped it would be 1/sqrt(2)).
    # n=2: {dog dog} vs {dog runs} -> 0. Score = 10 * (1 / (2 sqrt(2))) / 4.
    scores = cider_d_scores(["dog dog", "cat"], ["dog runs", "cat sleeps"])
    assert scores[0] == pytest.approx(10 / (8 * math.sqrt(2)))


def test_consensus_caption_beats_an_unrelated_one():
    refs = [["a red circle on the left", "a red circle at the left"], ["a blue square", "one blue square"]]
    good = cider_d_scores(["a red circle on the left", "a blue square"], refs)
    bad = cider_d_scores(["green triangles everywhere today", "a blue square"], refs)
    assert good[0] > bad[0]


def test_no_shared_ngram_scores_zero():
    refs = [["a red circle"], ["a blue square"]]
    assert cider_d_scores(["green triangle", "a blue square"], refs)[0] == 0.0


def test_single_image_scores_zero_because_every_ngram_is_in_every_document():
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 reference sets"):
        cider_d(["a", "b"], [["a"]])
