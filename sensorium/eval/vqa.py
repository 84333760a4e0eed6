"""VQA accuracy (VQAv2): an answer is fully right when at least 3 of the 10 annotators gave it.

Antol et al., "VQA: Visual Question Answering" (ICCV 2015), with the leave-one-out averaging of the
official evaluation: the score is ``min(1, matches / 3)`` averaged over the 10 ways of keeping 9 of the
10 human answers, so an answer given by 1, 2, 3 or 4+ annotators scores 0.3, 0.6, 0.9 or 1.
"""

import re
from collections.abc import Sequence

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # thousands separator: "1,000" → "1000"
_PERIOD = re.compile(r"\.(?!\d)")  # a period not starting a decimal part
_APOSTROPHES = re.compile(r"['\u2018\u2019]")
_PUNCTUATION = re.compile(r"[^\w\s.]|_")


def normalize_answer(answer: str) -> str:
    """Normalise a short answer much as the official VQA evaluation does before comparing.

    Lowercases; removes thousands separators (``"1,000"`` → ``"1000"``) and periods, except a decimal
    point (``"2.5"`` stays); deletes apostrophes (``"don't"`` → ``"dont"``); turns other punctuation
    into spaces; spells the number words ``none``/``zero`` … ``ten`` as digits; drops the articles
    ``a``, ``an`` and ``the``; collapses whitespace.

    Args:
        answer: a predicted or human answer.

    Returns:
        The normalised answer.
    """
    text = _DIGIT_COMMA.sub("", answer.lower())
    text = _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", _PERIOD.sub("", text)))
    words = (_NUMBER_WORDS.get(w, w) for w in text.split())
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one answer against the human answers to its question.

    With ``k`` of ``n`` human answers equal to the prediction, leaving out a matching answer (``k``
    ways) keeps ``k - 1`` matches and leaving out another (``n - k`` ways) keeps ``k``.

    Args:
        prediction: the model's answer.
        answers: the human answers (10 in VQAv2), at least 2.

    Returns:
        The mean over the leave-one-out subsets of ``min(1, matches / 3)``, from 0 to 1.
    """
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError(f"VQA accuracy needs a list of at least 2 human answers, got {answers!r}")
    pred = normalize_answer(prediction)
    k = sum(normalize_answer(a) == pred for a in answers)
    n = len(answers)
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_score` over the questions.

    Args:
        predictions: one answer per question.
        answers: per question, its human answers (10 in VQAv2).

    Returns:
        VQA accuracy from 0 to 1.

    Raises:
        ValueError: if the lists differ in length or are empty, or a question has fewer than 2 answers.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(vqa_score(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
