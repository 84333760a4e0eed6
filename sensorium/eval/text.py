"""Text normalisation and reference handling shared by the text metrics."""

import re
from collections.abc import Sequence

_APOSTROPHES = re.compile(r"['\u2018\u2019]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """Lowercase ``text``, drop its punctuation and collapse its whitespace.

    Apostrophes are deleted (``"don't"`` → ``"dont"``, so a contraction matches its spelling without
    one); every other punctuation or symbol character becomes a space (``"black-and-white"`` →
    ``"black and white"``). Numbers and letters outside ASCII are kept as they are.

    Args:
        text: any string.

    Returns:
        The normalised text: lowercase words separated by single spaces, no leading or trailing space.
    """
    text = _APOSTROPHES.sub("", text.lower())
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def tokenize(text: str) -> list[str]:
    """Split ``text`` into words after :func:`normalize_text`.

    Args:
        text: any string.

    Returns:
        Its lowercase words, punctuation removed.
    """
    return normalize_text(text).split()


def reference_sets(references: Sequence[str | Sequence[str]], count: int) -> list[list[str]]:
    """Check a corpus's references and give one list of reference strings per sample.

    Args:
        references: per sample, its references; a bare string is read as that sample's only reference.
        count: the number of predictions they belong to.

    Returns:
        One non-empty list of reference strings per sample.
    """
    if len(references) != count:
        raise ValueError(f"{count} predictions but {len(references)} reference sets")
    sets = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for i, refs in enumerate(sets):
        if not refs:
            raise ValueError(f"sample {i} has no reference")
    return sets
