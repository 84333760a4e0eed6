"""Word error rate of transcripts, counted with jiwer on normalised text."""

from collections.abc import Sequence

import jiwer

from sensorium.eval.text import normalize_text


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate: (substitutions + deletions + insertions) / reference words.

    Both sides are normalised by :func:`sensorium.eval.text.normalize_text` first (lowercase,
    punctuation removed, whitespace collapsed), so ``"Three, one FOUR."`` matches ``"three one four"``.
    Numbers are not normalised: ``"3"`` and ``"three"`` differ. Errors and reference words are summed
    over the corpus before dividing, so long utterances weigh more than short ones.

    A reference that is empty after normalisation contributes no reference words, and every word of its
    prediction counts as an insertion.

    Args:
        predictions: one transcript per utterance.
        references: one reference transcript per utterance.

    Returns:
        The error rate as a fraction: 0 for perfect transcripts; above 1 when there are more errors
        than reference words.

    Raises:
        ValueError: if the lists differ in length, or every reference is empty (the rate is undefined).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    hyps = [normalize_text(p) for p in predictions]
    refs = [normalize_text(r) for r in references]
    reference_words = sum(len(r.split()) for r in refs)
    if reference_words == 0:
        raise ValueError("word error rate is undefined: every reference is empty after normalisation")
    # jiwer refuses empty references in some versions, so those pairs are counted here.
    errors = sum(len(h.split()) for h, r in zip(hyps, refs, strict=True) if not r)
    kept = [(h, r) for h, r in zip(hyps, refs, strict=True) if r]
    out = jiwer.process_words([r for _, r in kept], [h for h, _ in kept])
    errors += out.substitutions + out.deletions + out.insertions
    return errors / reference_words
