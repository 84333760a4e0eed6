"""Bad input at every entry point, in one table: each row names the input, the entry point that gets it
and the outcome — a clear error (its type and a fragment of its message) or, inside a training stream,
the sample skipped with its reason (counted by the training module). Property tests check that the
JSON readers raise nothing but their documented error on arbitrary bytes."""

import io
import json
import os
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from sensorium import load_backbone
from sensorium.adapters import AdapterError, load_adapter, save_adapter
from sensorium.adapters.artifact import read_manifest
from sensorium.data.features import FeatureSampleDecoder
from sensorium.data.shards import (
    image_sample_decoder,
    parse_json_field,
    speech_sample_decoder,
    video_sample_decoder,
)
from sensorium.data.synthetic import encode_mp4, render_moving_clip, render_shapes_sample
from sensorium.encoders.image import ImagePreprocess, load_image
from sensorium.encoders.speech import SAMPLE_RATE, AudioPreprocess, SpeechEncoderSpec
from sensorium.encoders.video import DecordReader, VideoPreprocess
from sensorium.errors import CheckpointError, MediaError, UnsupportedCheckpointError
from tests.conftest import make_hf_llama
from tests.tiny import make_parts

SHARD = "/data/train/shard-000007.tar"  # where a shard sample says it came from
CAPTION = b'{"text": "a red circle"}'


# ------------------------------------------------------------------------------------------ inputs
@cache
def jpeg() -> bytes:
    img, _ = render_shapes_sample(np.random.default_rng(0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@cache
def png() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg())).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@cache
def mp4() -> bytes:
    frames, _ = render_moving_clip(np.random.default_rng(0), size=32, frames=8)
    return encode_mp4(frames)


def audio_bytes(wave: np.ndarray, fmt: str = "FLAC", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format=fmt, subtype=subtype)
    return buf.getvalue()


def speech() -> np.ndarray:
    return (0.3 * np.sin(np.arange(SAMPLE_RATE) / 7)).astype(np.float32)


def npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def sample(**fields: bytes) -> dict[str, Any]:
    """A raw shard sample as webdataset yields it."""
    return {"__key__": "sample-42", "__url__": SHARD, **fields}


# ----------------------------------------------------------------------------------- entry points
def image_shard(field: bytes, ext: str = "jpg", js: bytes = CAPTION) -> Callable[[Path], Any]:
    return lambda tmp: image_sample_decoder(ImagePreprocess(32, [0.5] * 3, [0.5] * 3))(sample(**{ext: field, "json": js}))


def video_shard(field: bytes) -> Callable[[Path], Any]:
    decode = video_sample_decoder(VideoPreprocess(ImagePreprocess(32, [0.5] * 3, [0.5] * 3), 4))
    return lambda tmp: decode(sample(mp4=field, json=CAPTION))


def speech_shard(field: bytes, ext: str = "flac") -> Callable[[Path], Any]:
    return lambda tmp: speech_sample_decoder(AudioPreprocess(SpeechEncoderSpec()))(sample(**{ext: field, "json": CAPTION}))


def feature_shard(field: bytes) -> Callable[[Path], Any]:
    return lambda tmp: FeatureSampleDecoder("image")(sample(**{"000.image.npy": field, "json": CAPTION}))


def image_file(data: bytes | None, name: str = "x.png") -> Callable[[Path], Any]:
    """``load_image`` on a file (what ``sensorium generate --image`` reads); None: no such file."""
    def run(tmp: Path) -> Any:
        if data is not None:
            (tmp / name).write_bytes(data)
        return load_image(tmp / name)
    return run


def hf_backbone(edit: Callable[[Path], None]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        make_hf_llama(tmp / "hf")
        edit(tmp / "hf" / "model.safetensors")
        return load_backbone(tmp / "hf")
    return run


def retype(dtype: torch.dtype) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        save_file({k: (v * 100).to(dtype) for k, v in load_file(str(f)).items()}, str(f))
    return edit


def truncate_header(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:20])


class Payload:
    """Unpickling this would create ``path`` (a stand-in for running any code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def meta_backbone_with_code(tmp: Path) -> Any:
    folder = tmp / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128}))
    torch.save({"tok_embeddings.weight": torch.zeros(128, 64), "x": Payload(str(tmp / "pwned"))},
               folder / "consolidated.00.pth")
    try:
        return load_backbone(folder)
    finally:
        assert not (tmp / "pwned").exists(), "loading a checkpoint ran code"


def gguf_of(arch: str) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        import gguf

        path = tmp / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return load_backbone(path)
    return run


def adapter_folder(edit: Callable[[Path], None]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        bb, _, xattn, _ = make_parts()
        folder = save_adapter(xattn, tmp / "adapter", backbone=bb)
        edit(folder)
        return load_adapter(folder, backbone=bb)
    return run


def manifest(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        m.update(changes)
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


def manifest_text(text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / "manifest.json").write_text(text)
    return edit


def adapter_weights(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: edit(folder / "adapter.safetensors")


def collated(messages: list[dict[str, str]]) -> Callable[[Path], Any]:
    """A decoded image sample with these turns through the training collator (its ``bad`` list)."""
    def run(tmp: Path) -> Any:
        from sensorium.backbone import load_tokenizer
        from sensorium.data.collate import ChatCollator
        from tests.training.test_image_training import tiny_backbone_folder

        tok = load_tokenizer(tiny_backbone_folder(tmp / "bb"))
        collate = ChatCollator(tok, {"image": 200}, tokens_per_item={"image": 1})
        decoded = {"__key__": "sample-42", "__url__": SHARD, "messages": messages,
                   "media": {"image": [torch.zeros(3, 32, 32)]}}
        batch = collate([decoded])
        assert len(batch) == 0 and len(batch.bad) == 1
        return {"__bad__": " ".join(batch.bad[0])}  # (shard, key, reason), as the end-of-training report prints it
    return run


# ------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Raises:
    """A clear error: this type, with this fragment in a message of one line (the CLI prints it as is)."""
    error: type[BaseException]
    fragment: str


@dataclass(frozen=True)
class Skipped:
    """Inside a training stream: the sample is marked bad with this reason (and names its shard and key)."""
    fragment: str


@dataclass(frozen=True)
class Decoded:
    """Not bad at all."""


CASES = [
    # images in shards
    ("image truncated", image_shard(jpeg()[: len(jpeg()) // 3]), Skipped("not a readable image")),
    ("image zero bytes", image_shard(b""), Skipped("zero bytes")),
    ("image: text in a .jpg", image_shard(b"this is not an image"), Skipped("not a readable image")),
    ("image: PNG bytes in a .jpg", image_shard(png()), Decoded()),  # decoders read the content, not the name
    ("image claiming 10000x10000 pixels", image_shard(png_claiming(10_000, 10_000), "png"),
     Skipped("10000x10000 pixels is more than 64000000")),
    ("image claiming 30000x30000 pixels", image_shard(png_claiming(30_000, 30_000), "png"),
     Skipped("decompression bomb")),
    # image files (sensorium generate --image)
    ("image file truncated", image_file(png()[:100]), Raises(MediaError, "x.png: not a readable image")),
    ("image file missing", image_file(None), Raises(MediaError, "x.png: cannot read")),
    ("image file zero bytes", image_file(b""), Raises(MediaError, "x.png: zero bytes")),
    ("image file claiming 30000x30000", image_file(png_claiming(30_000, 30_000)), Raises(MediaError, "decompression bomb")),
    # video clips
    ("mp4 zero length", lambda tmp: DecordReader()(b"", 4), Raises(MediaError, "zero-length video")),
    ("mp4 undecodable", lambda tmp: DecordReader()(b"\0\0\0\x18ftypmp42" + os.urandom(2000), 4),
     Raises(MediaError, "not a readable video")),
    ("mp4 truncated", lambda tmp: DecordReader()(mp4()[: len(mp4()) // 4], 4), Raises(MediaError, "<bytes>")),
    ("mp4 truncated in a shard", video_shard(mp4()[: len(mp4()) // 4]), Skipped("sample-42.mp4")),
    ("mp4 zero bytes in a shard", video_shard(b""), Skipped("zero bytes")),
    # audio
    ("audio NaN-filled", lambda tmp: AudioPreprocess(SpeechEncoderSpec())((np.full(SAMPLE_RATE, np.nan), SAMPLE_RATE)),
     Raises(MediaError, "NaN or infinite samples")),
    ("audio silent", lambda tmp: AudioPreprocess(SpeechEncoderSpec())((np.zeros(SAMPLE_RATE), SAMPLE_RATE)),
     Raises(MediaError, "silent")),
    ("audio undecodable", lambda tmp: AudioPreprocess(SpeechEncoderSpec())(b"RIFF\0\0garbage, no audio"),
     Raises(MediaError, "not readable audio")),
    ("audio truncated FLAC", lambda tmp: AudioPreprocess(SpeechEncoderSpec())(audio_bytes(speech())[:200]),
     Raises(MediaError, "")),
    ("audio NaN float WAV in a shard", speech_shard(audio_bytes(np.full(SAMPLE_RATE, np.nan, np.float32), "WAV", "FLOAT"),
                                                     "wav"), Skipped("NaN or infinite samples")),
    ("audio silent in a shard", speech_shard(audio_bytes(np.zeros(SAMPLE_RATE, np.float32))), Skipped("silent")),
    # the JSON of a shard sample
    ("json deeply nested", lambda tmp: parse_json_field(b"[" * 100_000 + b"]" * 100_000, "s"),
     Raises(MediaError, "malformed JSON")),
    ("json not an object", lambda tmp: parse_json_field(b'["a red circle"]', "s"), Raises(MediaError, "must be an object")),
    ("json without text", lambda tmp: parse_json_field(b'{"caption": "a red circle"}', "s"),
     Raises(MediaError, "needs a string 'text'")),
    ("json text not a string", lambda tmp: parse_json_field(b'{"text": ["a"]}', "s"), Raises(MediaError, "'text'")),
    ("json messages with a tool role", lambda tmp: parse_json_field(
        b'{"messages": [{"role": "tool", "content": "hi"}]}', "s"), Raises(MediaError, "'messages' must be")),
    ("json messages empty", lambda tmp: parse_json_field(b'{"messages": []}', "s"), Raises(MediaError, "'messages' must be")),
    ("json message content not text", lambda tmp: parse_json_field(
        b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "s"), Raises(MediaError, "'messages' must be")),
    ("json not UTF-8", lambda tmp: parse_json_field(b'{"text": "\xff\xfe"}', "s"), Raises(MediaError, "malformed JSON")),
    ("json 5000-digit integer", lambda tmp: parse_json_field(b'{"text": "a", "n": ' + b"9" * 5000 + b"}", "s"),
     Raises(MediaError, "malformed JSON")),
    ("json lone surrogate", lambda tmp: parse_json_field(b'{"text": "\\ud800"}', "s"), Raises(MediaError, "malformed JSON")),
    ("json bad in a shard", image_shard(png(), js=b'{"text": '), Skipped("shard-000007.tar:sample-42: malformed JSON")),
    ("no json in a shard", lambda tmp: image_sample_decoder(ImagePreprocess(32, [0.5] * 3, [0.5] * 3))(sample(jpg=jpeg())),
     Skipped("no .json field")),
    ("messages with more <|image|> than images", collated(
        [{"role": "user", "content": "<|image|><|image|>Describe."}, {"role": "assistant", "content": "red"}]),
     Skipped("more <|image|> placeholders than image items")),
    # backbone checkpoints
    ("backbone safetensors truncated header", hf_backbone(truncate_header), Raises(CheckpointError, "cannot read safetensors")),
    ("backbone safetensors of int64 weights", hf_backbone(retype(torch.int64)), Raises(CheckpointError, "dtype torch.int64")),
    ("backbone .pth that runs code when unpickled", meta_backbone_with_code,
     Raises(CheckpointError, "Unsupported global")),
    ("GGUF of another architecture", gguf_of("gpt2"), Raises(UnsupportedCheckpointError, "GGUF architecture 'gpt2'")),
    # adapter folders
    ("adapter safetensors of int64 weights", adapter_folder(adapter_weights(retype(torch.int64))),
     Raises(AdapterError, "expected a floating dtype")),
    ("adapter safetensors truncated header", adapter_folder(adapter_weights(truncate_header)),
     Raises(AdapterError, "cannot read safetensors")),
    ("manifest of unknown format_version", adapter_folder(manifest(format_version=99)),
     Raises(AdapterError, "format_version 99 is not supported")),
    ("manifest deeply nested", adapter_folder(manifest_text("[" * 100_000 + "]" * 100_000)),
     Raises(AdapterError, "not valid JSON")),
    ("manifest with a 5000-digit integer", adapter_folder(manifest_text('{"format_version": ' + "9" * 5000 + "}")),
     Raises(AdapterError, "not valid JSON")),
    # cached-feature shards
    ("feature npy pickled", feature_shard(npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)),
     Skipped("allow_pickle=False")),
    ("feature npy float64", feature_shard(npy(np.zeros((4, 8)))), Skipped("features must be float32 (N, D), found float64")),
    ("feature npy int32", feature_shard(npy(np.zeros((4, 8), np.int32))), Skipped("must be float32")),
    ("feature npy 3-D", feature_shard(npy(np.zeros((2, 4, 8), np.float32))), Skipped("must be float32 (N, D)")),
    ("feature npy truncated", feature_shard(npy(np.zeros((4, 8), np.float32))[:90]), Skipped("unreadable npy")),
]


@pytest.mark.parametrize("name, run, outcome", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input(name, run, outcome, tmp_path):
    if isinstance(outcome, Raises):
        with pytest.raises(outcome.error) as e:
            run(tmp_path)
        assert outcome.fragment in str(e.value), str(e.value)
        assert "\n" not in str(e.value).strip(), f"not one line: {e.value}"
    else:
        out = run(tmp_path)
        if isinstance(outcome, Skipped):
            assert "__bad__" in out, out
            assert outcome.fragment in out["__bad__"], out["__bad__"]
            assert "sample-42" in out["__bad__"], "the reason names the sample"
        else:
            assert "__bad__" not in out, out["__bad__"]


# --------------------------------------------------------------------------------------- properties
JSON_KEYS = st.sampled_from(["text", "messages", "role", "content", "format", "format_version", "modality", "kind",
                             "config", "backbone", "attributes"]) | st.text(max_size=8)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
           | ROLES | st.sampled_from(["sensorium-adapter", "image", "cross_attention"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(JSON_KEYS, inner, max_size=5), max_leaves=25)


HOSTILE = st.sampled_from([b'{"text": "a", "n": ' + b"9" * 5000 + b"}", b'{"text": "\\ud800"}',
                           b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b"[" * 50_000 + b"]" * 50_000])


def _json_ish() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, JSON documents, and JSON documents cut short or with bytes spliced in."""
    docs = JSON_VALUES.map(lambda v: json.dumps(v).encode())
    cut = st.tuples(docs, st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    spliced = st.tuples(docs, st.integers(0, 200), st.binary(max_size=8)).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:])
    return st.binary(max_size=200) | docs | cut | spliced


@settings(max_examples=400, deadline=None)
@given(_json_ish() | HOSTILE)
def test_parse_json_field_raises_only_media_errors(data):
    try:
        obj = parse_json_field(data, "s")
    except MediaError as e:
        assert str(e).startswith("s: ")
        return
    assert isinstance(obj, dict)
    json.dumps(obj, ensure_ascii=False).encode("utf-8")  # every string is text a tokenizer takes (no lone surrogates)
    if "messages" in obj:
        assert obj["messages"] and all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                                      for m in obj["messages"])
    else:
        assert isinstance(obj["text"], str)


MANIFEST_DIR = Path(tempfile.mkdtemp(prefix="sensorium-manifest-"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json_ish() | JSON_VALUES.map(lambda v: json.dumps(
    {"format": "sensorium-adapter", "format_version": 1, "modality": "image", "kind": "x", "config": {},
     "backbone": {}, **(v if isinstance(v, dict) else {"extra": v})}).encode()))
def test_read_manifest_raises_only_adapter_errors(data):
    (MANIFEST_DIR / "manifest.json").write_bytes(data)
    try:
        m = read_manifest(MANIFEST_DIR)
    except AdapterError:
        return
    assert m["format"] == "sensorium-adapter" and m["format_version"] == 1
    assert all(isinstance(m[k], t) for k, t in (("modality", str), ("kind", str), ("config", dict), ("backbone", dict)))


def test_a_shard_of_bad_samples_decodes_to_bad_markers_not_exceptions(tmp_path):
    """The table's shard rows, written into one real tar, come out of the training stream as marked samples."""
    from sensorium.data.shards import ShardStream

    shard = tmp_path / "shard-000000.tar"
    rows = {"good": (jpeg(), CAPTION), "truncated": (jpeg()[:500], CAPTION), "empty": (b"", CAPTION),
            "bomb": (png_claiming(30_000, 30_000), CAPTION), "badjson": (jpeg(), b"[1, 2"),
            "bigint": (jpeg(), b'{"text": "a", "n": ' + b"9" * 5000 + b"}")}
    with tarfile.open(shard, "w") as t:
        for key, (img, js) in rows.items():
            for name, data in ((f"{key}.jpg", img), (f"{key}.json", js)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    decode = image_sample_decoder(ImagePreprocess(32, [0.5] * 3, [0.5] * 3))
    out = {s["__key__"]: s for s in ShardStream(shard, decode)}
    assert sorted(out) == sorted(rows)
    assert [k for k, s in out.items() if "__bad__" not in s] == ["good"]
