"""webdataset pipelines: shards → decoded samples, with bad samples marked (not raised) so training can
skip, count and report them.

A decoded sample is ``{"__key__", "__url__", "media": {modality: [item, ...]}, "text" | "messages", ...}``;
a sample that cannot be decoded is ``{"__key__", "__url__", "__bad__": reason}``. Decoding happens after
shuffling (memory) and in DataLoader workers.
"""

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sensorium.errors import MediaError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a folder, a glob, a brace pattern or a list; an empty result is an error."""
    import glob

    import braceexpand

    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for s in map(str, specs):
        if Path(s).is_dir():
            urls += sorted(str(p) for p in Path(s).glob("*.tar"))
        elif "{" in s:
            urls += list(braceexpand.braceexpand(s))
        elif any(c in s for c in "*?["):
            urls += sorted(glob.glob(s))
        else:
            urls.append(s)
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec}")
    return urls


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


def parse_json_field(data: bytes, name: str) -> dict[str, Any]:
    """A sample's JSON: an object with ``text`` (string) or ``messages`` (list of role/content objects)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MediaError(f"{name}: malformed JSON ({e})") from e
    if not isinstance(obj, dict):
        raise MediaError(f"{name}: JSON must be an object, found {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise MediaError(f"{name}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif not isinstance(obj.get("text"), str):
        raise MediaError(f"{name}: JSON needs a string 'text' or a 'messages' list")
    return obj


VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")


class SampleDecoder:
    """Decode a raw media-text sample: every field of the modality (sorted by name) through ``preprocess``.

    Args:
        modality: ``"image"``, ``"video"``...
        exts: file extensions that hold this modality.
        preprocess: media → tensor (the encoder's picklable transform).
        decode_bytes: bytes → what ``preprocess`` takes (default: the bytes themselves); raises MediaError.
    """

    def __init__(self, modality: str, exts: Sequence[str], preprocess: Callable[[Any], Any],
                 decode_bytes: Callable[..., Any] | None = None) -> None:
        self.modality, self.exts, self.preprocess, self.decode_bytes = modality, tuple(exts), preprocess, decode_bytes

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        name = f"{url}:{key}"
        try:
            if "json" not in raw:
                raise MediaError(f"{name}: no .json field")
            out = parse_json_field(raw["json"], name)
            fields = sorted(k for k in raw if k.rsplit(".", 1)[-1].lower() in self.exts)
            items = []
            for f in fields:
                data = raw[f]
                if not data:
                    raise MediaError(f"{name}.{f}: zero bytes")
                if self.decode_bytes is not None:
                    data = self.decode_bytes(data, name=f"{name}.{f}")
                try:
                    items.append(self.preprocess(data))
                except MediaError as e:
                    raise MediaError(f"{name}.{f}: {e}") from e
        except MediaError as e:
            return {"__key__": key, "__url__": url, "__bad__": str(e)}
        out.update(__key__=key, __url__=url, media={self.modality: items} if items else {})
        return out


def image_sample_decoder(preprocess: Callable[[Any], Any]) -> SampleDecoder:
    """Decoder for image-text samples (``.jpg``/``.png``/``.webp`` + ``.json``)."""
    from sensorium.encoders.image import decode_image_bytes

    return SampleDecoder("image", IMAGE_EXTS, preprocess, decode_image_bytes)


def video_sample_decoder(preprocess: Callable[[Any], Any]) -> SampleDecoder:
    """Decoder for video-text samples (``.mp4`` and other containers + ``.json``): frames sampled by ``preprocess``."""
    return SampleDecoder("video", VIDEO_EXTS, preprocess)


AUDIO_EXTS = ("flac", "wav", "ogg")


def speech_sample_decoder(preprocess: Callable[[Any], Any]) -> SampleDecoder:
    """Decoder for speech-text samples (``.flac``/``.wav``/``.ogg`` + ``.json``): audio bytes through ``preprocess``."""
    return SampleDecoder("speech", AUDIO_EXTS, preprocess)


def sample_pipeline(
    urls: str | Path | Sequence[str | Path],
    decode: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    shuffle: int = 0,
    seed: int = 0,
    resampled: bool = False,
    epoch_samples: int | None = None,
):
    """A webdataset ``IterableDataset`` of decoded samples.

    Args:
        urls: shards (folder, glob, brace pattern or list).
        decode: raw sample → decoded sample (see the module docstring).
        shuffle: sample shuffle buffer (0: keep shard order, for evaluation).
        seed: shuffling seed.
        resampled: draw shards with replacement forever (multi-node training; use ``epoch_samples``).
        epoch_samples: samples per epoch *per worker* (``with_epoch``), for resampled streams.
    """
    import webdataset as wds

    shard_list = expand_urls(urls)
    ds = wds.WebDataset(
        shard_list,
        resampled=resampled,
        shardshuffle=(len(shard_list) if shuffle else False) if not resampled else True,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        handler=_warn_and_continue,
        seed=seed,
        empty_check=False,
    )
    if shuffle:
        ds = ds.shuffle(shuffle, initial=min(shuffle, 100), seed=seed)
    ds = ds.map(decode)
    if epoch_samples:
        ds = ds.with_epoch(epoch_samples)
    return ds
