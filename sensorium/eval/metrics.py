"""Metrics for generated text."""

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sensorium.data.synthetic import COLOURS, DIRECTIONS, POSITION_PHRASES, SHAPES, SIZES

SHAPES_VOCABULARY: dict[str, Sequence[str]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITION_PHRASES),
}
MOVING_VOCABULARY: dict[str, Sequence[str]] = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}


def _first(words: Sequence[str], text: str) -> str | None:
    """The vocabulary word mentioned first in ``text`` (whole words, case-insensitive)."""
    hits = [(m.start(), w) for w in words for m in [re.search(rf"\b{re.escape(w)}\b", text.lower())] if m]
    return min(hits)[1] if hits else None


def attribute_accuracy(results: Iterable[Mapping[str, Any]],
                       vocabulary: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Accuracy of each attribute named in the predictions of a synthetic set.

    Args:
        results: ``{"prediction": str, "reference": str, "attributes": {...}}`` per sample.
        vocabulary: attribute → its words (default: the shapes set's colour, shape, size, position).

    Returns:
        One accuracy per attribute, ``colour_and_shape`` (both right) and ``exact`` (the whole caption),
        as fractions.
    """
    vocab = vocabulary or SHAPES_VOCABULARY
    rows = list(results)
    assert rows, "no results to score"
    hits = {k: 0 for k in (*vocab, "colour_and_shape", "exact")}
    for r in rows:
        pred, attrs = r["prediction"], r["attributes"]
        ok = {k: _first(words, pred) == attrs[k] for k, words in vocab.items()}
        for k, v in ok.items():
            hits[k] += v
        hits["colour_and_shape"] += ok["colour"] and ok["shape"]
        hits["exact"] += pred.strip().lower().rstrip(".") == (r.get("reference") or "").strip().lower()
    return {k: v / len(rows) for k, v in hits.items()}
