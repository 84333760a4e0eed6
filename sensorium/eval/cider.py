"""CIDEr-D, the consensus-based caption metric of the COCO caption evaluation.

Vedantam, Zitnick and Parikh, "CIDEr: Consensus-based Image Description Evaluation" (CVPR 2015).
Each caption becomes, for every n-gram length n = 1..4, a vector of n-gram counts weighted by their
inverse document frequency, where the documents are the images' reference sets: an n-gram that most
images' references contain says little about any one image. The candidate's vector is compared with
each reference's by a cosine similarity in which the candidate's counts are clipped to the reference's,
damped by a Gaussian penalty on the difference of their lengths (the "-D" variant, which stops a
caption from gaining by repeating the n-grams people agree on or by growing long). The similarities
are averaged over the references and over n, and multiplied by 10.

Captions are tokenised by :func:`sensorium.eval.text.tokenize`: lowercase, punctuation removed,
split on whitespace (COCO uses the PTB tokenizer, so scores can differ slightly from published ones).
"""

import math
from collections import Counter
from collections.abc import Sequence

from sensorium.eval.text import reference_sets, tokenize

NGram = tuple[str, ...]


def _ngram_counts(tokens: Sequence[str], max_n: int) -> list[Counter[NGram]]:
    """Counts of the n-grams of ``tokens``, one counter per length 1..max_n."""
    return [
        Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, max_n + 1)
    ]


def _tfidf(
    counts: list[Counter[NGram]], idf: dict[NGram, float], default_idf: float
) -> list[dict[NGram, float]]:
    """Weight each n-gram count by its inverse document frequency."""
    return [{g: c * idf.get(g, default_idf) for g, c in per_n.items()} for per_n in counts]


def _norm(vector: dict[NGram, float]) -> float:
    return math.sqrt(sum(v * v for v in vector.values()))


def cider_d_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    max_n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """CIDEr-D of each prediction, with document frequencies taken over the whole corpus.

    A candidate's score depends on the other samples through the document frequencies, so score a
    whole evaluation set at once. With a single image every n-gram is in every reference set and every
    score is 0.

    Args:
        predictions: one generated caption per image.
        references: per image, its human captions (a bare string counts as one caption).
        max_n: the longest n-gram counted.
        sigma: width of the Gaussian length penalty, in words.

    Returns:
        One score per prediction, from 0 (no weighted n-gram in common with its references) to at most
        10 (identical to each of them); COCO results are often quoted ×100.
    """
    refs = reference_sets(references, len(predictions))
    candidates = [tokenize(p) for p in predictions]
    ref_tokens = [[tokenize(r) for r in rs] for rs in refs]

    # Document frequency: the number of images whose reference set holds the n-gram at least once.
    df: Counter[NGram] = Counter()
    for rs in ref_tokens:
        df.update({g for r in rs for per_n in _ngram_counts(r, max_n) for g in per_n})
    log_images = math.log(len(refs)) if refs else 0.0
    idf = {g: log_images - math.log(max(1.0, d)) for g, d in df.items()}  # unseen n-grams: df 0 → log N

    scores = []
    for cand, rs in zip(candidates, ref_tokens, strict=True):
        cand_vec = _tfidf(_ngram_counts(cand, max_n), idf, log_images)
        cand_norms = [_norm(v) for v in cand_vec]
        total = 0.0
        for ref in rs:
            ref_vec = _tfidf(_ngram_counts(ref, max_n), idf, log_images)
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for c, r, c_norm in zip(cand_vec, ref_vec, cand_norms, strict=True):
                r_norm = _norm(r)
                if c_norm == 0 or r_norm == 0:
                    continue
                # Clipping: a candidate n-gram counts at most as often as the reference has it.
                dot = sum(min(v, r[g]) * r[g] for g, v in c.items() if g in r)
                total += penalty * dot / (c_norm * r_norm)
        scores.append(10.0 * total / (max_n * len(rs)))
    return scores


def cider_d(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    max_n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` over the images.

    Args:
        predictions: one generated caption per image.
        references: per image, its human captions (a bare string counts as one caption).
        max_n: the longest n-gram counted.
        sigma: width of the Gaussian length penalty, in words.

    Returns:
        The corpus score, on CIDEr-D's own scale from 0 to 10 (COCO results are often quoted ×100).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    scores = cider_d_scores(predictions, references, max_n=max_n, sigma=sigma)
    return sum(scores) / len(scores)
