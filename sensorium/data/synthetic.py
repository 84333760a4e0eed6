"""Offline synthetic data sets for demos and tests, written as webdataset shards.

``shapes``: coloured geometric shapes (colour, shape, size, horizontal position) on noisy backgrounds,
captioned like "a small red triangle on the left"; the JSON also holds the centre (``x``, ``y``).
``moving-shapes``: mp4 clips (PyAV, H.264) of a shape moving left, right, up or down, captioned like
"a red circle moving left". Splits ``train``, ``val`` and ``test`` go to ``OUT/<split>/shard-NNNNNN.tar``;
``OUT/info.json`` records the set, its version, counts and the seed.
"""

import io
import json
import math
import shutil
from collections.abc import Iterator
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


def default_split_sizes(num: int) -> dict[str, int]:
    """Train size ``num``; validation and test sets sized for stable accuracy figures (test ≥ 256)."""
    return {"train": num, "val": max(128, num // 20), "test": max(256, num // 10)}


def is_current(out: str | Path, name: str) -> bool:
    """Whether ``out`` holds synthetic set ``name`` made by this version of its generator."""
    info = Path(out) / "info.json"
    if not info.is_file():
        return False
    try:
        meta = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("name") == name and meta.get("version") == VERSION


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


GENERATORS = {"shapes": _shapes_samples, "moving-shapes": _moving_samples}
VERSION = 2  # bumped when a generator changes; older sets are regenerated on first use


def make_dataset(name: str, out: str | Path, *, num: int = 4000, seed: int = 0, per_shard: int = 1000) -> Path:
    """Generate synthetic set ``name`` into ``out`` with train/val/test splits; return ``out``.

    Each split has its own random stream, so the test set does not depend on the train size.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic data set {name!r} (known: {', '.join(GENERATORS)})")
    out = Path(out)
    sizes = default_split_sizes(num)
    for i, (split, n) in enumerate(sizes.items()):
        if (out / split).is_dir():
            shutil.rmtree(out / split)
        rng = np.random.default_rng([seed, i])
        write_shards(GENERATORS[name](n, rng), out / split, total=n, per_shard=per_shard, desc=f"{name}/{split}")
    info = {"name": name, "version": VERSION, "seed": seed, "splits": sizes}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return out
