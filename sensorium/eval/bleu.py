"""BLEU: clipped n-gram precision with a brevity penalty (Papineni et al., 2002).

Two flavours: :func:`bleu4` for captions, computed here on normalised words (lowercase, punctuation
removed) as caption benchmarks report it, and :func:`translation_bleu` for speech translation, which is
sacreBLEU's standard corpus BLEU on the raw text so that numbers compare with published ones.
Both return BLEU on a 0–100 scale.
"""

import math
from collections import Counter
from collections.abc import Sequence

from sacrebleu.metrics import BLEU

from sensorium.eval.text import reference_sets, tokenize


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _closest_length(length: int, ref_lengths: Sequence[int]) -> int:
    """The reference length nearest ``length``; of two equally near, the shorter."""
    return min(ref_lengths, key=lambda r: (abs(r - length), r))


def bleu4(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, max_n: int = 4) -> float:
    """Corpus BLEU-4 of captions against several references each, without smoothing.

    Text is tokenised by :func:`sensorium.eval.text.tokenize` (lowercase, punctuation removed, split on
    whitespace). N-gram matches are clipped to the largest count of that n-gram in any one reference and
    summed over the corpus; the brevity penalty compares the corpus's candidate length with the sum of
    the reference lengths closest to each candidate (the shorter on a tie); the n = 1..4 precisions get
    equal weights. On normalised text this equals sacreBLEU's ``corpus_bleu(..., tokenize="none",
    smooth_method="none")``.

    Args:
        predictions: one generated caption per sample.
        references: per sample, its reference captions (a bare string counts as one caption).
        max_n: the longest n-gram counted.

    Returns:
        BLEU from 0 to 100; 0 when some n-gram length has no match in the whole corpus.
    """
    refs = reference_sets(references, len(predictions))
    matches, totals = [0] * max_n, [0] * max_n
    cand_length = ref_length = 0
    for prediction, rs in zip(predictions, refs, strict=True):
        cand = tokenize(prediction)
        ref_tokens = [tokenize(r) for r in rs]
        cand_length += len(cand)
        ref_length += _closest_length(len(cand), [len(r) for r in ref_tokens])
        for n in range(1, max_n + 1):
            counts = _ngrams(cand, n)
            most: Counter[tuple[str, ...]] = Counter()
            for r in ref_tokens:
                most |= _ngrams(r, n)  # element-wise maximum over the references
            matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(cand) - n + 1)
    if cand_length == 0 or 0 in matches:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if cand_length >= ref_length else math.exp(1 - ref_length / cand_length)
    return 100.0 * brevity * math.exp(log_precision)


def translation_bleu(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, tokenizer: str = "13a"
) -> float:
    """SacreBLEU corpus BLEU of translations, with its default exponential smoothing.

    Args:
        predictions: one detokenised translation per sample.
        references: per sample, its reference translation or translations; samples may have different
            numbers of references.
        tokenizer: sacreBLEU's tokenizer: ``"13a"`` (its default, for most languages), ``"zh"``,
            ``"ja-mecab"``, ``"flores200"``, ``"char"``, ``"none"``, ...

    Returns:
        BLEU from 0 to 100, case-sensitive as sacreBLEU's default.
    """
    refs = reference_sets(references, len(predictions))
    width = max((len(rs) for rs in refs), default=1)
    # sacreBLEU takes one stream per reference position; None marks a sample with fewer references.
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(width)]
    return float(BLEU(tokenize=tokenizer).corpus_score(list(predictions), streams).score)
