"""VQA accuracy: the leave-one-out average and answer normalisation."""

import pytest

from sensorium.eval import normalize_answer, vqa_accuracy, vqa_score


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_answer_given_by_k_of_10_annotators(k: int, expected: float):
    # Leaving out one of the k matching answers (k ways) keeps k - 1 matches; leaving out one of the
    # 10 - k others keeps k. acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10:
    # k=1: (0 + 9 * 1/3) / 10 = 0.3;  k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9;  k=4: (4 * 1 + 6 * 1) / 10 = 1.
    answers = ["two"] * k + ["three"] * (10 - k)
    assert vqa_score("two", answers) == pytest.approx(expected)


def test_answers_are_normalised_before_matching():
    assert vqa_score("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("the dog", ["a dog", "dog", "Dog!"] + ["cat"] * 7) == pytest.approx(0.9)
    assert normalize_answer("The 1,000 Dogs!") == "1000 dogs"
    assert normalize_answer("2.5") == "2.5" and normalize_answer("None") == "0"
    assert normalize_answer("t-shirt") == "t shirt" and normalize_answer("don't") == "dont"


def test_corpus_accuracy_is_the_mean_over_questions():
    answers = [["two"] * 3 + ["three"] * 7, ["cat"] + ["dog"] * 9]
    assert vqa_accuracy(["2", "cat"], answers) == pytest.approx((0.9 + 0.3) / 2)


def test_a_bare_string_of_answers_is_an_error():
    with pytest.raises(ValueError, match="at least 2 human answers"):
        vqa_score("yes", "yes")
