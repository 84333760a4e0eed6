"""Offline synthetic data sets for demos and tests, written as webdataset shards.

``shapes``: coloured geometric shapes (colour, shape, size, horizontal position) on noisy backgrounds,
captioned like "a small red triangle on the left"; the JSON also holds the centre (``x``, ``y``).
``moving-shapes``: mp4 clips (PyAV, H.264) of a shape moving left, right, up or down, captioned like
"a red circle moving left".
``spoken-words``: 16 kHz FLAC utterances synthesised offline with eSpeak NG (:mod:`sensorium.data.espeak`):
a digit string read as words ("three one four") or a short list of words ("red cat book"), in a random
English voice, rate and pitch, with a random gain and white noise; the JSON holds the transcript and its
word-by-word French translation ("trois un quatre", "rouge chat livre").
``shapes-instruct``, ``moving-shapes-instruct``, ``spoken-words-instruct``: LIMA-style instruction sets over
the same media (the same render functions), each sample a chat of 1-3 turns about that medium (see
:func:`instruction_chat`).
Splits ``train``, ``val`` and ``test`` go to ``OUT/<split>/shard-NNNNNN.tar``; ``OUT/info.json`` records
the set, its version, counts and the seed.
"""

import functools
import io
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 215, 30), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.16, "large": 0.30}  # fraction of the image side
POSITIONS = {"left": 0.2, "middle": 0.5, "right": 0.8}  # horizontal centre as a fraction of the side
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
IMAGE_SIZE = 112


def shapes_caption(attrs: dict[str, str]) -> str:
    """The caption for a shapes sample, e.g. "a small red triangle on the left"."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]}"


def _noisy_background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(60, 200)
    tint = rng.uniform(-15, 15, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    return np.clip(base + tint + noise, 0, 255).astype(np.uint8)  # (S, S, 3)


def draw_shape(shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float, img: Image.Image) -> None:
    """Draw one filled shape of radius ``r`` pixels centred at ``(cx, cy)``."""
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=colour)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_shapes_sample(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, dict[str, str]]:
    """One random image and its attributes."""
    attrs = {
        "colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
        "size": str(rng.choice(list(SIZES))), "position": str(rng.choice(list(POSITIONS))),
    }
    img = Image.fromarray(_noisy_background(rng, size))
    r = SIZES[attrs["size"]] * size * rng.uniform(0.9, 1.1)
    cx = POSITIONS[attrs["position"]] * size + rng.uniform(-0.05, 0.05) * size
    cy = size * rng.uniform(0.25, 0.75)
    jitter = rng.integers(-20, 21, size=3)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[attrs["colour"]], jitter, strict=True))
    draw_shape(attrs["shape"], colour, cx, cy, r, img)
    return img, {**attrs, "x": round(cx / size, 3), "y": round(cy / size, 3)}


def _shapes_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        img, attrs = render_shapes_sample(rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        yield {"jpg": buf.getvalue(), "json": {"text": shapes_caption(attrs), "attributes": attrs}}


DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CLIP_FRAMES, CLIP_FPS = 16, 8


def moving_caption(attrs: dict[str, str]) -> str:
    """The caption of a moving-shapes clip, e.g. "a red circle moving left"."""
    return f"a {attrs['colour']} {attrs['shape']} moving {attrs['direction']}"


def render_moving_clip(rng: np.random.Generator, size: int = IMAGE_SIZE, frames: int = CLIP_FRAMES
                       ) -> tuple[list[np.ndarray], dict[str, str]]:
    """Frames ``(H, W, 3)`` uint8 of one shape crossing half the frame in one direction, and its attributes."""
    attrs = {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
             "direction": str(rng.choice(list(DIRECTIONS)))}
    dx, dy = DIRECTIONS[attrs["direction"]]
    background = _noisy_background(rng, size)
    r = 0.13 * size * rng.uniform(0.9, 1.1)
    along0 = rng.uniform(0.2, 0.3) * size  # start a quarter in; travel half the frame
    across = rng.uniform(0.3, 0.7) * size
    travel = 0.5 * size
    jitter = rng.integers(-20, 21, size=3)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[attrs["colour"]], jitter, strict=True))
    out = []
    for t in range(frames):
        pos = along0 + travel * t / (frames - 1)
        if dx < 0 or dy < 0:
            pos = size - pos
        cx, cy = (pos, across) if dx else (across, pos)
        noise = rng.normal(0, 6, size=background.shape)
        img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
        draw_shape(attrs["shape"], colour, cx, cy, r, img)
        out.append(np.asarray(img))
    return out, attrs


def encode_mp4(frames: list[np.ndarray], *, fps: int = CLIP_FPS) -> bytes:
    """H.264 mp4 bytes of RGB frames (PyAV)."""
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _moving_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        frames, attrs = render_moving_clip(rng)
        yield {"mp4": encode_mp4(frames), "json": {"text": moving_caption(attrs), "attributes": attrs}}


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (  # concrete words whose French is one word, so a list translates word by word
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown",
    "cat", "dog", "horse", "bird", "fish", "cow", "mouse", "rabbit", "sheep", "duck", "bear",
    "book", "chair", "door", "window", "cup", "key", "car", "house", "tree", "bed", "spoon",
)
FRENCH: dict[str, str] = {
    "zero": "zéro", "one": "un", "two": "deux", "three": "trois", "four": "quatre", "five": "cinq",
    "six": "six", "seven": "sept", "eight": "huit", "nine": "neuf",
    "red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune", "black": "noir", "white": "blanc",
    "pink": "rose", "brown": "marron",
    "cat": "chat", "dog": "chien", "horse": "cheval", "bird": "oiseau", "fish": "poisson", "cow": "vache",
    "mouse": "souris", "rabbit": "lapin", "sheep": "mouton", "duck": "canard", "bear": "ours",
    "book": "livre", "chair": "chaise", "door": "porte", "window": "fenêtre", "cup": "tasse", "key": "clé",
    "car": "voiture", "house": "maison", "tree": "arbre", "bed": "lit", "spoon": "cuillère",
}
SPEECH_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")  # eSpeak NG voices
SPEECH_VARIANTS = ("", "m1", "m3", "f2", "f4")  # "" = the voice's own (male) timbre
SPEECH_RATE = (130, 210)  # words per minute
SPEECH_PITCH = (30, 70)  # eSpeak pitch, 50 = the voice's normal
SPEECH_SNR_DB = (20.0, 40.0)  # white noise against the power of the whole utterance
SPEECH_PEAK = (0.2, 0.9)  # peak amplitude after the random gain
AUDIO_RATE = 16000


def french_translation(words: Sequence[str]) -> str:
    """Word-by-word French of a transcript from :data:`DIGITS` and :data:`WORDS`, e.g. "trois un quatre"."""
    return " ".join(FRENCH[w] for w in words)


def spoken_words_transcript(rng: np.random.Generator) -> tuple[str, list[str]]:
    """``(kind, words)``: 3-6 digits read one by one (``"digits"``) or 2-4 distinct words (``"words"``)."""
    if rng.random() < 0.5:
        return "digits", [DIGITS[i] for i in rng.integers(0, len(DIGITS), size=int(rng.integers(3, 7)))]
    return "words", [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(2, 5)), replace=False)]


@functools.lru_cache(maxsize=4)
def _resample_kernel(orig_rate: int, new_rate: int) -> tuple[np.ndarray, int, int, int]:
    import torchaudio.transforms as T

    gcd = math.gcd(orig_rate, new_rate)
    r = T.Resample(orig_rate, new_rate)  # torchaudio's windowed-sinc kernel, one row per output phase
    return r.kernel[:, 0].numpy(), r.width, orig_rate // gcd, new_rate // gcd


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of mono float32 samples: torchaudio's kernel, applied with numpy.

    Equal to ``torchaudio.functional.resample`` up to float rounding. The product is a single-threaded
    einsum on purpose: torch's and OpenBLAS's thread pools made this small product 10-140 ms per second
    of audio on a busy 2-core machine against 2 ms (measured), and one thread keeps it bit-reproducible.
    """
    if orig_rate == new_rate:
        return audio
    kernel, width, o, n = _resample_kernel(orig_rate, new_rate)  # kernel (n, K)
    padded = np.pad(audio.astype(np.float32, copy=False), (width, width + o))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::o]  # (F, K)
    out = np.einsum("fk,nk->fn", frames, kernel).reshape(-1)  # (F, n) -> (F * n,)
    return out[: math.ceil(n * len(audio) / o)]


def encode_flac(audio: np.ndarray, sample_rate: int = AUDIO_RATE) -> bytes:
    """16-bit FLAC bytes of mono float samples in ``[-1, 1]`` (soundfile)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def render_spoken_words_sample(rng: np.random.Generator) -> tuple[np.ndarray, str, dict[str, Any]]:
    """One utterance: 16 kHz mono float32 samples, its transcript and its attributes.

    The samples depend on ``rng`` only: eSpeak's output is a function of text, voice, rate and pitch.
    """
    from sensorium.data.espeak import synthesize

    kind, words = spoken_words_transcript(rng)
    variant = SPEECH_VARIANTS[int(rng.integers(len(SPEECH_VARIANTS)))]
    voice = SPEECH_VOICES[int(rng.integers(len(SPEECH_VOICES)))] + (f"+{variant}" if variant else "")
    rate = int(rng.integers(SPEECH_RATE[0], SPEECH_RATE[1] + 1))
    pitch = int(rng.integers(SPEECH_PITCH[0], SPEECH_PITCH[1] + 1))
    peak = float(rng.uniform(*SPEECH_PEAK))
    snr_db = float(rng.uniform(*SPEECH_SNR_DB))
    text = " ".join(words)
    speech, rate_hz = synthesize(text, voice=voice, rate=rate, pitch=pitch)
    speech = resample(speech, rate_hz, AUDIO_RATE)
    speech *= peak / max(float(np.abs(speech).max()), 1e-6)
    noise_std = math.sqrt(float(np.mean(speech.astype(np.float64) ** 2)) / 10 ** (snr_db / 10))
    audio = np.clip(speech + rng.normal(0.0, noise_std, size=speech.shape), -1.0, 1.0).astype(np.float32)
    attrs = {"kind": kind, "voice": voice, "rate": rate, "pitch": pitch, "snr_db": round(snr_db, 2),
             "peak": round(peak, 3), "seconds": round(len(audio) / AUDIO_RATE, 3)}
    return audio, text, attrs


def _spoken_words_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        audio, text, attrs = render_spoken_words_sample(rng)
        json_ = {"text": text, "translation": {"fr": french_translation(text.split())}, "attributes": attrs}
        yield {"flac": encode_flac(audio), "json": json_}


# ----------------------------------------------------------------------------------- instruction sets
# LIMA ("Less Is More for Alignment"): about a thousand varied, consistent examples teach the chat format
# on top of what pre-training (here: captioning) taught. Each sample is a chat of 1-3 turns: the first user
# turn is the medium's placeholder followed by a question, later turns ask a follow-up about another
# attribute without repeating the medium. Answer style, the same in every set: the caption's own words
# for what was asked, lowercase, no final period ("red", "triangle", "small", "on the left", "left"),
# "yes"/"no" for yes/no questions, the base caption for a description request, the transcript or its
# French for speech, and counts as English number words ("three").

SHAPES_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "Which colour is it?", "Tell me the colour of the object.",
               "What color is the shape?", "What is the colour of the shape in the picture?"),
    "shape": ("What shape is it?", "Which shape do you see?", "Name the shape.", "What kind of shape is shown?",
              "What is the shape in the image?"),
    "size": ("Is the shape small or large?", "How big is the shape?", "What size is the object?",
             "Is it a small or a large shape?"),
    "position": ("Is it on the left, in the middle or on the right?", "Where is the shape?",
                 "Where in the image is the object?", "Which side of the picture is the shape on?"),
    "caption": ("Describe the image.", "What do you see?", "Give a short description of the picture.",
                "What is in this image?", "Describe the picture in a few words."),
}
MOVING_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "Which colour is it?", "Tell me the colour of the moving object.",
               "What color is the shape in the video?"),
    "shape": ("What shape is it?", "Which shape is moving?", "Name the shape.", "What kind of shape is in the clip?"),
    "direction": ("Which way does it move?", "In which direction is the shape moving?",
                  "Where is the shape going?", "Is it moving left, right, up or down?",
                  "Which direction does the object travel in?"),
    "caption": ("Describe the video.", "What happens in the clip?", "Describe what you see.",
                "Give a short description of the video."),
}
SPEECH_QUESTIONS: dict[str, tuple[str, ...]] = {
    "transcript": ("What was said?", "Transcribe the audio.", "Repeat after me in English:",
                   "Write down what you heard.", "What words do you hear?"),
    "translation": ("Translate what was said into French.", "Translate into French:",
                    "How do you say that in French?", "What is that in French?"),
    "count": ("How many words were said?", "How many words do you hear?", "Count the spoken words."),
    "first": ("What was the first word?", "Which word came first?"),
    "last": ("What was the last word?", "Which word came last?"),
    "kind": ("Were those digits or words?", "Is it a list of digits or of words?"),
}
FOLLOW_UPS: dict[str, tuple[str, ...]] = {  # extra forms for later turns (the medium is already in the chat)
    "colour": ("And its colour?", "What colour is it, then?"),
    "shape": ("And what shape is it?", "And its shape?"),
    "size": ("And its size?", "Is it small or large?"),
    "position": ("And where is it?", "Where is it, then?"),
    "direction": ("And which way does it go?", "Which way is it heading?"),
    "caption": ("Now describe it.", "Can you describe it?"),
    "transcript": ("And what was said?", "Can you write it down?"),
    "translation": ("And in French?", "Now translate it into French."),
    "count": ("How many words was that?",),
    "first": ("And the first word?",),
    "last": ("And the last word?",),
    "kind": ("Digits or words?",),
}
CHECK_QUESTIONS: dict[str, tuple[str, ...]] = {  # yes/no questions; "{v}" is the value asked about
    "colour": ("Is the shape {v}?", "Is it {v}?"),
    "shape": ("Is it a {v}?", "Is this a {v}?"),
    "size": ("Is the shape {v}?", "Is it {v}?"),
    "position": ("Is the shape {v}?", "Is it {v}?"),
    "direction": ("Is it moving {v}?", "Does the shape move {v}?"),
}
CHECK_PROBABILITY = 0.2  # share of attribute questions asked as yes/no
TURN_COUNTS = ((1, 0.5), (2, 0.3), (3, 0.2))  # turns per chat and their probabilities
INSTRUCT_TASKS = {"transcript": "asr", "translation": "translate"}  # speech: test-scoring task of the last answer


def _attribute_values(attr: str) -> list[str]:
    """Every value of a shapes/moving-shapes attribute, in the words an answer uses."""
    return {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
            "position": list(POSITION_PHRASES.values()), "direction": list(DIRECTIONS)}[attr]


def instruction_chat(rng: np.random.Generator, placeholder: str, answers: dict[str, str],
                     questions: dict[str, tuple[str, ...]], weights: dict[str, float],
                     checkable: dict[str, list[str]] | None = None
                     ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A chat of 1-3 turns about one medium, and what each answer is about.

    Args:
        rng: the random stream (the chat depends on it only).
        placeholder: the medium's placeholder, put at the start of the first user turn only.
        answers: topic → its answer (the topics the chat may ask about).
        questions: topic → question forms.
        weights: topic → relative chance of being asked (topics are drawn without replacement).
        checkable: topic → every value it can take; such topics are asked as yes/no questions now and then.

    Returns:
        ``(messages, asks)``: the alternating user/assistant turns, and per answer ``{"topic": ...}``
        (with ``"check"``: the value a yes/no question asked about).
    """
    checkable = checkable or {}
    counts, probs = zip(*TURN_COUNTS, strict=True)
    topics = list(answers)
    p = np.array([weights[t] for t in topics], dtype=float)
    n = min(int(rng.choice(counts, p=probs)), len(topics))
    chosen = [topics[i] for i in rng.choice(len(topics), size=n, replace=False, p=p / p.sum())]
    messages: list[dict[str, str]] = []
    asks: list[dict[str, str]] = []
    for turn, topic in enumerate(chosen):
        ask = {"topic": topic}
        if topic in checkable and rng.random() < CHECK_PROBABILITY:
            truth = answers[topic]
            others = [v for v in checkable[topic] if v != truth]
            value = truth if rng.random() < 0.5 else others[int(rng.integers(len(others)))]
            forms = CHECK_QUESTIONS[topic]
            question = forms[int(rng.integers(len(forms)))].format(v=value)
            answer = "yes" if value == truth else "no"
            ask["check"] = value
        else:
            forms = questions[topic] + (FOLLOW_UPS.get(topic, ()) if turn else ())
            question, answer = forms[int(rng.integers(len(forms)))], answers[topic]
        messages += [{"role": "user", "content": (placeholder if turn == 0 else "") + question},
                     {"role": "assistant", "content": answer}]
        asks.append(ask)
    return messages, asks


def earlier_turns(rng: np.random.Generator, kinds: Sequence[str] = ("image", "video")) -> list[dict[str, Any]]:
    """One or two text-only exchanges about media of ``kinds`` (``"image"``: a shapes image, ``"video"``: a
    moving-shapes clip, ``"speech"``: spoken words, transcribed or translated): what stands before a turn
    later in a chat whose earlier turns were about other media. The answers carry ``"loss": False``
    (context, not targets)."""

    def pick(values: Sequence[str]) -> str:
        return values[int(rng.integers(len(values)))]

    unknown = sorted(set(kinds) - {"image", "video", "speech"})
    if unknown or not kinds:
        raise ValueError(f"earlier turns are about image, video or speech, got {list(kinds)}")
    out: list[dict[str, Any]] = []
    for _ in range(1 + int(rng.random() < 0.4)):
        kind = kinds[int(rng.random() * len(kinds))]
        if kind == "image":
            attrs = {"colour": pick(list(COLOURS)), "shape": pick(SHAPES), "size": pick(list(SIZES)),
                     "position": pick(list(POSITIONS))}
            questions = SHAPES_QUESTIONS
            answers = {**attrs, "position": POSITION_PHRASES[attrs["position"]], "caption": shapes_caption(attrs)}
        elif kind == "video":
            attrs = {"colour": pick(list(COLOURS)), "shape": pick(SHAPES), "direction": pick(list(DIRECTIONS))}
            questions, answers = MOVING_QUESTIONS, {**attrs, "caption": moving_caption(attrs)}
        else:
            words = spoken_words_transcript(rng)[1]
            questions = {t: SPEECH_QUESTIONS[t] for t in ("transcript", "translation")}
            answers = {"transcript": " ".join(words), "translation": french_translation(words)}
        topic = "caption" if kind != "speech" and rng.random() < 0.5 else pick(list(questions))
        out += [{"role": "user", "content": pick(questions[topic])},
                {"role": "assistant", "content": answers[topic], "loss": False}]
    return out


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _shapes_instruct_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    attrs_ = ("colour", "shape", "size", "position")
    weights = {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "caption": 0.6}
    for _ in range(n):
        img, attrs = render_shapes_sample(rng)
        caption = shapes_caption(attrs)
        answers = {a: attrs[a] for a in attrs_} | {"position": POSITION_PHRASES[attrs["position"]], "caption": caption}
        messages, asks = instruction_chat(rng, "<|image|>", answers, SHAPES_QUESTIONS, weights,
                                          {a: _attribute_values(a) for a in attrs_})
        json_ = {"messages": messages, "asks": asks, "text": caption, "attributes": attrs}
        yield {"jpg": _jpeg(img), "json": json_}


def _moving_instruct_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    attrs_ = ("colour", "shape", "direction")
    weights = {"colour": 1.0, "shape": 1.0, "direction": 1.5, "caption": 0.6}
    for _ in range(n):
        frames, attrs = render_moving_clip(rng)
        caption = moving_caption(attrs)
        answers = {a: attrs[a] for a in attrs_} | {"caption": caption}
        messages, asks = instruction_chat(rng, "<|video|>", answers, MOVING_QUESTIONS, weights,
                                          {a: _attribute_values(a) for a in attrs_})
        json_ = {"messages": messages, "asks": asks, "text": caption, "attributes": attrs}
        yield {"mp4": encode_mp4(frames), "json": json_}


def _spoken_words_instruct_samples(n: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    weights = {"transcript": 3.0, "translation": 2.0, "count": 1.0, "first": 0.7, "last": 0.7, "kind": 0.6}
    for _ in range(n):
        audio, text, attrs = render_spoken_words_sample(rng)
        words = text.split()
        french = french_translation(words)
        answers = {"transcript": text, "translation": french, "count": DIGITS[len(words)], "first": words[0],
                   "last": words[-1], "kind": attrs["kind"]}
        messages, asks = instruction_chat(rng, "<|speech|>", answers, SPEECH_QUESTIONS, weights)
        task = INSTRUCT_TASKS.get(asks[-1]["topic"], "qa")
        json_ = {"messages": messages, "asks": asks, "task": task, "text": text, "translation": {"fr": french},
                 "attributes": attrs}
        yield {"flac": encode_flac(audio), "json": json_}


def default_split_sizes(num: int, num_eval: int | None = None) -> dict[str, int]:
    """Train size ``num``; validation and test sets of ``num_eval`` samples each, by default sized for
    stable accuracy figures (test ≥ 256)."""
    if num_eval is not None:
        return {"train": num, "val": num_eval, "test": num_eval}
    return {"train": num, "val": max(128, num // 20), "test": max(256, num // 10)}


def read_set_info(out: str | Path) -> dict[str, Any] | None:
    """The ``info.json`` of a generated set (name, generator version, seed, split sizes), or None."""
    try:
        meta = json.loads((Path(out) / "info.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def is_current(out: str | Path, name: str) -> bool:
    """Whether ``out`` holds synthetic set ``name`` made by this version of its generator."""
    meta = read_set_info(out)
    return meta is not None and meta.get("name") == name and meta.get("version") == VERSION


def write_shards(samples: Iterator[dict[str, Any]], folder: Path, *, total: int, per_shard: int = 1000,
                 desc: str = "") -> list[Path]:
    """Write ``{ext: bytes | json-able}`` samples to ``folder/shard-NNNNNN.tar``; return the shard paths."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, sample in enumerate(tqdm(samples, total=total, desc=desc, unit="sample", leave=False)):
            record = {"__key__": f"{i:08d}"}
            for ext, value in sample.items():
                record[ext] = json.dumps(value).encode() if ext == "json" else value
            sink.write(record)
    return sorted(folder.glob("shard-*.tar"))


GENERATORS = {
    "shapes": _shapes_samples, "moving-shapes": _moving_samples, "spoken-words": _spoken_words_samples,
    "shapes-instruct": _shapes_instruct_samples, "moving-shapes-instruct": _moving_instruct_samples,
    "spoken-words-instruct": _spoken_words_instruct_samples,
}
DEFAULT_TRAIN_SIZES = {  # training samples per set when none is asked for (instruction sets: LIMA's ~1k)
    "shapes": 4000, "moving-shapes": 4000, "spoken-words": 4000,
    "shapes-instruct": 1000, "moving-shapes-instruct": 1000, "spoken-words-instruct": 1000,
}
VERSION = 2  # bumped when a generator changes; older sets are regenerated on first use


def make_dataset(name: str, out: str | Path, *, num: int | None = None, seed: int = 0, per_shard: int = 1000,
                 num_eval: int | None = None) -> Path:
    """Generate synthetic set ``name`` into ``out`` with train/val/test splits; return ``out``.

    Each split has its own random stream, so the test set does not depend on the train size. ``num``
    is the training size (default: :data:`DEFAULT_TRAIN_SIZES`), ``num_eval`` the validation and test
    sizes (default: :func:`default_split_sizes`); a smaller test split is the first items of the larger one.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic data set {name!r} (known: {', '.join(GENERATORS)})")
    out = Path(out)
    num = DEFAULT_TRAIN_SIZES[name] if num is None else num
    if num < 1 or (num_eval is not None and num_eval < 1):
        raise ValueError(f"a synthetic set needs at least one sample per split (num={num}, num_eval={num_eval})")
    sizes = default_split_sizes(num, num_eval)
    for i, (split, n) in enumerate(sizes.items()):
        if (out / split).is_dir():
            shutil.rmtree(out / split)
        rng = np.random.default_rng([seed, i])
        write_shards(GENERATORS[name](n, rng), out / split, total=n, per_shard=per_shard, desc=f"{name}/{split}")
    info = {"name": name, "version": VERSION, "seed": seed, "splits": sizes}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return out
