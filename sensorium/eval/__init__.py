"""Evaluation: metrics and runners."""

from sensorium.eval.bleu import bleu4, translation_bleu
from sensorium.eval.cider import cider_d, cider_d_scores
from sensorium.eval.exact_match import accuracy
from sensorium.eval.metrics import MOVING_VOCABULARY, SHAPES_VOCABULARY, attribute_accuracy
from sensorium.eval.text import normalize_text, tokenize
from sensorium.eval.vqa import normalize_answer, vqa_accuracy, vqa_score
from sensorium.eval.wer import wer

__all__ = [
    "MOVING_VOCABULARY",
    "SHAPES_VOCABULARY",
    "accuracy",
    "attribute_accuracy",
    "bleu4",
    "cider_d",
    "cider_d_scores",
    "normalize_answer",
    "normalize_text",
    "tokenize",
    "translation_bleu",
    "vqa_accuracy",
    "vqa_score",
    "wer",
]
