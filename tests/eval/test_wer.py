"""Word error rate: hand-counted edits and the normalisation both sides get."""

import pytest

from sensorium.eval import wer

PREDICTIONS = ["the cat sat on mat", "a red square", "Hello big WORLD"]
REFERENCES = ["The cat sat on the mat.", "a blue square", "Hello, world!"]


def test_hand_counted_edits():
    # "the cat sat on mat" vs 6 reference words: "the" before "mat" deleted -> 1 deletion, 1/6.
    # "a red square" vs "a blue square": 1 substitution, 1/3.
    # "hello big world" vs "hello world": "big" inserted -> 1 insertion, 1/2.
    assert [wer([p], [r]) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)] == pytest.approx(
        [1 / 6, 1 / 3, 1 / 2]
    )
    # The corpus rate sums errors and reference words: 3 / (6 + 3 + 2), not the mean of the three.
    assert wer(PREDICTIONS, REFERENCES) == pytest.approx(3 / 11)


def test_empty_reference_counts_its_prediction_as_insertions():
    assert wer([*PREDICTIONS, "uh um"], [*REFERENCES, "..."]) == pytest.approx(5 / 11)
    with pytest.raises(ValueError, match="every reference is empty"):
        wer(["uh"], [""])


def test_normalisation():
    assert wer(["Three, one FOUR."], ["three   one four"]) == 0.0
    assert wer(["3 1 4"], ["three one four"]) == 1.0  # numbers are not normalised
