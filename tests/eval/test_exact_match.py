"""Exact-match accuracy after normalisation."""

import pytest

from sensorium.eval import accuracy, normalize_answer, normalize_text


def test_exact_match_after_normalisation():
    predictions = ["A red circle.", "blue  square", "moving LEFT!"]
    references = ["a red circle", "red square", "moving left"]
    assert accuracy(predictions, references) == pytest.approx(2 / 3)


def test_custom_normalisation():
    assert accuracy(["the two dogs"], ["2 dogs"]) == 0.0
    assert accuracy(["the two dogs"], ["2 dogs"], normalize=normalize_answer) == 1.0


def test_normalize_text():
    assert normalize_text("  Don't  STOP, black-and-white_cat!\n") == "dont stop black and white cat"


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])
