"""Frozen-encoder feature cache: run the encoder once over a shard set, then train on its outputs.

Feature shards mirror their source: the same splits, shard names, keys and JSON, with every media item
replaced by the encoder's output tokens ``(N, D)`` as ``NNN.<modality>.npy`` (float32 npy, read with
``allow_pickle=False``). A sample that could not be decoded keeps its key and carries its reason in
``bad.txt``, so training skips and counts it exactly as it would on the raw media. ``info.json`` records
the encoder (its spec and a hash of its weights) and the source shards, so stale features are rebuilt
and features of another encoder are refused.
"""

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sensorium.data.shards import expand_urls, parse_json_field
from sensorium.errors import MediaError, SensoriumError

FEATURES_KIND = "sensorium-features"
FEATURES_VERSION = 1
SPLITS = ("train", "val", "test")


class FeatureCacheError(SensoriumError):
    """Cached features were made by another encoder (or are not a feature set)."""


def encoder_fingerprint(encoder: Any) -> dict[str, Any]:
    """What makes an encoder's outputs: its spec (less the weights' path) and a hash of its weights."""
    spec = {k: v for k, v in encoder.spec_dict().items() if k != "checkpoint"}
    h = hashlib.sha256()
    for name, t in sorted(encoder.weights().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"spec": spec, "weights_sha256": h.hexdigest()}


def source_fingerprint(root: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Shard files of ``root`` (relative name → size in bytes)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_size for s in splits if (root / s).is_dir()
            for p in sorted((root / s).glob("*.tar"))}


def read_info(folder: str | Path) -> dict[str, Any] | None:
    """The ``info.json`` of a feature folder, or None when ``folder`` holds no feature set."""
    try:
        info = json.loads((Path(folder) / "info.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) and info.get("kind") == FEATURES_KIND else None


def is_current(folder: str | Path, encoder: Any, source: str | Path) -> bool:
    """Whether ``folder`` holds features of ``source`` made by ``encoder``."""
    info = read_info(folder)
    return (info is not None and info.get("version") == FEATURES_VERSION
            and info.get("encoder") == encoder_fingerprint(encoder) and info.get("source") == source_fingerprint(source))


def check_features(folder: str | Path, encoder: Any) -> dict[str, Any]:
    """The info of feature folder ``folder``; refuse it when another encoder made it."""
    info = read_info(folder)
    if info is None:
        raise FeatureCacheError(f"{folder}: not a feature set (no info.json of kind {FEATURES_KIND}); "
                                "make one with `sensorium features --config R.yaml --out DIR`")
    want = encoder_fingerprint(encoder)
    if info.get("encoder") != want:
        have = info.get("encoder", {})
        diff = sorted(k for k in {*have.get("spec", {}), *want["spec"]} if have.get("spec", {}).get(k) != want["spec"].get(k))
        what = f"spec fields {', '.join(diff)} differ" if diff else "its weights differ"
        raise FeatureCacheError(f"{folder}: features were made by another encoder ({what}); rebuild them")
    return info


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
    tar.addfile(ti, io.BytesIO(data))


def write_features(
    encoder: torch.nn.Module,
    decode: Callable[[dict[str, Any]], dict[str, Any]],
    source: str | Path,
    out: str | Path,
    *,
    modality: str,
    splits: tuple[str, ...] = SPLITS,
    batch_size: int = 32,
) -> Path:
    """Encode every media item of ``source/<split>/*.tar`` with ``encoder`` into feature shards under ``out``.

    Args:
        encoder: the frozen encoder (``forward(inputs) -> Features``, ``spec_dict()``, ``weights()``).
        decode: raw sample → decoded sample (the training decoder: same preprocessing).
        source: folder with split folders of webdataset shards.
        out: the feature folder (each shard is written atomically; ``info.json`` last).
        modality: the media modality the encoder reads.
        splits: splits to encode (those present).
        batch_size: items per encoder call.
    """
    source, out = Path(source), Path(out)
    present = [s for s in splits if (source / s).is_dir()]
    if not present:
        raise FeatureCacheError(f"{source}: no {'/'.join(splits)} shard folders to encode")
    encoder.eval()
    (out / "info.json").unlink(missing_ok=True)  # the set is incomplete until info.json is back
    counts: dict[str, dict[str, int]] = {}
    for split in present:
        (out / split).mkdir(parents=True, exist_ok=True)
        urls = expand_urls(source / split)
        for stale in set((out / split).glob("*.tar")) - {out / split / Path(u).name for u in urls}:
            stale.unlink()
        counts[split] = {"samples": 0, "bad": 0}
        with tqdm(desc=f"features {split}", unit="sample") as bar:
            for url in urls:
                good, bad = _encode_shard(url, out / split / Path(url).name, encoder, decode, modality, batch_size, bar)
                counts[split]["samples"] += good
                counts[split]["bad"] += bad
    info = {"kind": FEATURES_KIND, "version": FEATURES_VERSION, "modality": modality,
            "encoder": encoder_fingerprint(encoder), "source": source_fingerprint(source), "source_path": str(source),
            "splits": counts}
    tmp = out / "info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / "info.json")
    return out


def _encode_shard(url: str, target: Path, encoder: torch.nn.Module, decode: Callable[[dict[str, Any]], dict[str, Any]],
                  modality: str, batch_size: int, bar: tqdm) -> tuple[int, int]:
    """Encode one source shard into ``target`` (written atomically), keeping the sample order."""
    import webdataset as wds

    n_good = n_bad = 0
    tmp = target.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        pending: list[tuple[str, bytes, list[torch.Tensor], str | None]] = []  # in shard order
        for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            sample = decode(raw)
            js = raw.get("json") if isinstance(raw.get("json"), bytes) else b"{}"
            if "__bad__" in sample:
                pending.append((raw["__key__"], js, [], str(sample["__bad__"])))
                n_bad += 1
            else:
                pending.append((raw["__key__"], js, list(sample.get("media", {}).get(modality, [])), None))
                n_good += 1
            if sum(len(p[2]) for p in pending) >= batch_size:
                _write_pending(tar, pending, encoder, modality, batch_size)
            bar.update()
        _write_pending(tar, pending, encoder, modality, batch_size)
    os.replace(tmp, target)
    return n_good, n_bad


def _write_pending(tar: tarfile.TarFile, pending: list[tuple[str, bytes, list[torch.Tensor], str | None]],
                   encoder: torch.nn.Module, modality: str, batch_size: int) -> None:
    device = next(iter(encoder.parameters()), torch.zeros(0)).device
    items = [t for _, _, ts, _ in pending for t in ts]
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            if len({tuple(t.shape) for t in chunk}) == 1:
                feats += list(encoder(torch.stack(chunk).to(device)).values.float().cpu())
            else:
                feats += [encoder(t[None].to(device)).values.float().cpu()[0] for t in chunk]
    j = 0
    for key, js, ts, bad in pending:
        _add(tar, f"{key}.json", js)
        if bad is not None:
            _add(tar, f"{key}.bad.txt", bad.encode())
        for k in range(len(ts)):
            _add(tar, f"{key}.{k:03d}.{modality}.npy", _npy_bytes(feats[j].numpy()))
            j += 1
    pending.clear()


class FeatureSampleDecoder:
    """Decode a feature-shard sample: ``{"media": {modality: [(N, D) float32 tensor, ...]}, ...json}``.

    Args:
        modality: the modality whose features the shards hold.
    """

    def __init__(self, modality: str) -> None:
        self.modality = modality

    def __call__(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        name = f"{url}:{key}"
        try:
            if "bad.txt" in raw:
                raise MediaError(bytes(raw["bad.txt"]).decode("utf-8", "replace"))
            if "json" not in raw:
                raise MediaError(f"{name}: no .json field")
            out = parse_json_field(raw["json"], name)
            suffix = f".{self.modality}.npy"
            items = []
            for f in sorted(k for k in raw if k.endswith(suffix)):
                try:
                    a = np.load(io.BytesIO(raw[f]), allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise MediaError(f"{name}.{f}: unreadable npy ({e})") from e
                if a.dtype != np.float32 or a.ndim != 2:
                    raise MediaError(f"{name}.{f}: features must be float32 (N, D), found {a.dtype} {a.shape}")
                items.append(torch.from_numpy(a))
        except MediaError as e:
            return {"__key__": key, "__url__": url, "__bad__": str(e)}
        out.update(__key__=key, __url__=url, media={self.modality: items} if items else {})
        return out
