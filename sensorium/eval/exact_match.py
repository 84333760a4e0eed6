"""Exact-match accuracy of short answers (video QA, attribute questions)."""

from collections.abc import Callable, Sequence

from sensorium.eval.text import normalize_text


def accuracy(
    predictions: Sequence[str], references: Sequence[str], *, normalize: Callable[[str], str] = normalize_text
) -> float:
    """Fraction of predictions equal to their reference after normalisation.

    Args:
        predictions: one answer per question.
        references: one reference answer per question.
        normalize: applied to both sides before comparing; the default lowercases, removes punctuation
            and collapses whitespace (:func:`sensorium.eval.text.normalize_text`). Pass
            :func:`sensorium.eval.vqa.normalize_answer` to also drop articles and read number words.

    Returns:
        Accuracy from 0 to 1.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)
