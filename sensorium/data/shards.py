"""webdataset pipelines: shards → decoded samples, with bad samples marked (not raised) so training can
skip, count and report them.

A decoded sample is ``{"__key__", "__url__", "media": {modality: [item, ...]}, "text" | "messages", ...}``;
a sample that cannot be decoded is ``{"__key__", "__url__", "__bad__": reason}``. Decoding happens after
shuffling (memory) and in DataLoader workers.
"""

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from sensorium.errors import MediaError, SensoriumError

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
        # lone surrogates ("\\ud800") parse but are no text: the tokenizer would raise a TypeError later
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # ValueError: undecodable, malformed, integers over 4300 digits
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


def count_samples(urls: str | Path | Sequence[str | Path]) -> int:
    """Samples in local tar shards, counted from their member headers (nothing is read or decoded)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    n = 0
    for url in expand_urls(urls):
        if not Path(url).is_file():
            raise SensoriumError(f"{url}: not a local shard file; set the number of samples per epoch explicitly")
        with tarfile.open(url) as tar:
            last = None
            for member in tar:  # webdataset groups consecutive members with the same key into one sample
                key = base_plus_ext(member.name)[0] if member.isfile() else None
                if key is not None and key != last:
                    n, last = n + 1, key
    return n


def _buffer_shuffle(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (filled first, then one out for one in)."""
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = s
    rng.shuffle(buf)
    yield from buf


def _deal(samples: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Sample ``rank`` of every complete round of ``world_size`` samples."""
    rounds = iter(samples)
    while len(group := list(itertools.islice(rounds, world_size))) == world_size:
        yield group[rank]


class ShardStream(IterableDataset):
    """Decoded samples of webdataset shards, in an order that is a pure function of ``(seed, epoch, rank,
    world_size)``: the same for any number of DataLoader workers, and resumable part-way through an epoch.

    Order: with shuffling, every rank permutes the shard list with ``(seed, epoch)`` (the same permutation
    everywhere) and rank ``r`` reads shards ``r, r + world_size, ...`` of it, so ranks read disjoint
    shards; samples then pass a shuffle buffer seeded with ``(seed, epoch, rank)``. ``resampled`` makes a
    rank read its shards pass after pass (each pass in a new order) without end, and ``epoch_samples``
    ends each epoch after that many samples per rank: every rank then has the same number of batches,
    which distributed training needs (a rank that runs out first would leave the others waiting forever).

    Evaluation (``split="samples"``): every rank reads all shards in order and takes every
    ``world_size``-th sample, the last incomplete round left out, so all ranks get the same number of
    batches (a DDP forward waits for every rank, in validation too).

    DataLoader workers: a DataLoader asks its workers for batches in turn (batch ``b`` from worker
    ``b % num_workers``), so each worker reads the rank's whole raw stream (cheap: tar members are not
    decoded) and decodes only the samples of its own batches. ``batch_size`` must be the DataLoader's.

    Resuming: :meth:`set_position` picks the epoch and skips the samples an interrupted run had consumed
    (read, not decoded). Set it before the DataLoader starts its workers (they get a copy of this object).

    Args:
        urls: shards (folder, glob, brace pattern or list).
        decode: raw sample → decoded sample (see the module docstring).
        shuffle: sample shuffle buffer (0: keep shard order, for evaluation).
        seed: shuffling seed.
        resampled: read the rank's shards pass after pass without end (use ``epoch_samples``).
        epoch_samples: samples per epoch per rank (before the split over workers).
        batch_size: the DataLoader's batch size (how samples are dealt to workers).
        rank: this process's rank (default: from ``torch.distributed``, else 0).
        world_size: number of ranks (default: from ``torch.distributed``, else 1).
        split: how ranks share the data: ``"shards"`` (training) or ``"samples"`` (evaluation).
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        decode: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        shuffle: int = 0,
        seed: int = 0,
        resampled: bool = False,
        epoch_samples: int | None = None,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        split: str = "shards",
    ) -> None:
        super().__init__()
        if batch_size < 1 or (epoch_samples is not None and epoch_samples < 1):
            raise ValueError(f"batch_size ({batch_size}) and epoch_samples ({epoch_samples}) must be positive")
        if split not in ("shards", "samples") or (split == "samples" and resampled):
            raise ValueError(f"split must be 'shards' or (without resampling) 'samples', not {split!r}")
        self.split = split
        self.urls = expand_urls(urls)
        self.decode, self.shuffle, self.seed = decode, shuffle, seed
        self.resampled, self.epoch_samples, self.batch_size = resampled, epoch_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration in ``epoch``, after its first ``skip`` samples (of this rank)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def node(self) -> tuple[int, int]:
        """``(rank, world_size)``: as given, else from ``torch.distributed``, else ``(0, 1)``."""
        import torch.distributed as dist

        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def shards(self, rank: int, world_size: int) -> list[str]:
        """The shards ``rank`` reads in the current epoch (their first pass, in order)."""
        order = list(self.urls)
        if self.shuffle or self.resampled:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        share = order[rank::world_size] if self.split == "shards" else order
        if self.resampled and not share:
            raise SensoriumError(f"{len(self.urls)} shard(s) cannot feed {world_size} ranks: every rank needs at "
                                 f"least one (write more, smaller shards); first shard: {self.urls[0]}")
        return share

    def _raw(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        share = self.shards(rank, world_size)
        for n_pass in itertools.count():
            if n_pass:
                share = sorted(share)
                random.Random(f"pass/{self.seed}/{self.epoch}/{rank}/{n_pass}").shuffle(share)
            read = 0
            for sample in tarfile_samples(({"url": u} for u in share), handler=_warn_and_continue):
                read += 1
                yield sample
            if not self.resampled:
                return
            if not read:
                raise SensoriumError(f"rank {rank}: no readable samples in its shards {share[:3]}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        rank, world_size = self.node()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        raw: Iterable[dict[str, Any]] = self._raw(rank, world_size)
        if self.split == "samples" and world_size > 1:
            raw = _deal(raw, rank, world_size)
        if self.shuffle:
            raw = _buffer_shuffle(raw, self.shuffle, random.Random(f"samples/{self.seed}/{self.epoch}/{rank}"))
        raw = itertools.islice(raw, self.skip, self.epoch_samples)
        for i, sample in enumerate(raw):
            if (i // self.batch_size) % workers == worker:
                yield self.decode(sample)


sample_pipeline = ShardStream  # the pipeline entry point: an ``IterableDataset`` of decoded samples
