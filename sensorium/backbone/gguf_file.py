"""GGUF files (versions 2 and 3, little-endian): metadata, tensor layout and float32 weights.

The header is parsed with ``struct`` over a copy-on-write memory map, so opening a file reads only its
metadata; F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors are dequantised with torch (bit-identical to the
``gguf`` package), every other quantisation type through ``gguf.quants``.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorium.errors import CheckpointError

_SCALARS = {  # metadata value type → struct format (numpy reads the same codes for arrays)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}  # (values, bytes)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape (outermost dimension first, as torch orders it), GGML type and byte range."""

    name: str
    shape: tuple[int, ...]
    type: int
    start: int
    nbytes: int


class GGUFFile:
    """An opened GGUF file: ``fields`` (metadata key → value: numbers, strings, lists) and ``tensors``
    (name → :class:`TensorInfo`, in file order); :meth:`tensor` dequantises one to float32.

    Raises:
        CheckpointError: the file is not GGUF, is of an unsupported version or byte order, or is truncated.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._parse()
        except CheckpointError:
            raise
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def field(self, key: str, default: Any = None) -> Any:
        """The value of metadata field ``key``, or ``default``."""
        return self.fields.get(key, default)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantised to a new float32 tensor."""
        info = self.tensors[name]
        raw = torch.frombuffer(self._buf, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        try:
            values = _dequantise(raw, info.type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantise {name} (GGML type {info.type}: {e})") from e
        return values.reshape(info.shape)

    # -- parsing --------------------------------------------------------------------------------------------

    def _parse(self) -> None:
        self._at = 0
        if self._read(4) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a readable GGUF file (no GGUF magic number)")
        self.version = self._unpack("<I")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            what = "big-endian GGUF files are" if swapped in (2, 3) else f"GGUF version {self.version} is"
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({what} not supported; expected "
                                  "version 2 or 3, little-endian)")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        data_start = -(-self._at // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, kind, offset in infos:
            count = int(np.prod(shape, dtype=np.int64))
            try:
                per_block, block_bytes = _block_size(kind)
            except CheckpointError as e:
                raise CheckpointError(f"{self.path}: tensor {name}: {e}") from None
            if count % per_block:
                raise CheckpointError(f"{self.path}: tensor {name} of shape {shape} is not a whole number of "
                                      f"GGML type {kind} blocks")
            info = TensorInfo(name, shape, kind, data_start + offset, count // per_block * block_bytes)
            if info.start + info.nbytes > len(self._buf):
                raise CheckpointError(f"{self.path}: truncated GGUF file (tensor {name} ends at byte "
                                      f"{info.start + info.nbytes}, the file has {len(self._buf)})")
            self.tensors[name] = info

    def _read(self, n: int) -> bytes:
        if self._at + n > len(self._buf):
            raise CheckpointError(f"{self.path}: not a readable GGUF file (truncated header)")
        out = self._buf[self._at:self._at + n]
        self._at += n
        return out

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._at)
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._read(self._unpack("<Q")).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(self._read(count * dtype.itemsize), dtype=dtype).tolist()
            return [self._value(item) for _ in range(count)]
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        raise CheckpointError(f"{self.path}: not a readable GGUF file (unknown metadata value type {kind})")


def _block_size(kind: int) -> tuple[int, int]:
    """(values, bytes) of one block of GGML type ``kind``."""
    if kind in _BLOCKS:
        return _BLOCKS[kind]
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise CheckpointError(f"unknown GGML tensor type {kind}") from None


def _dequantise(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """Flat float32 values of the bytes ``raw`` of GGML type ``kind``."""
    if kind == F32:
        return raw.view(torch.float32).clone()
    if kind in (F16, BF16):
        return raw.view(torch.float16 if kind == F16 else torch.bfloat16).float()
    if kind == Q8_0:
        blocks = raw.view(-1, _BLOCKS[Q8_0][1])
        return (blocks[:, :2].view(torch.float16).float() * blocks[:, 2:].view(torch.int8).float()).flatten()
    if kind in (Q4_0, Q4_1):  # a block's 16 bytes hold values 0-15 in their low nibbles, 16-31 in the high ones
        blocks = raw.view(-1, _BLOCKS[kind][1])
        d = blocks[:, :2].view(torch.float16).float()
        qs = blocks[:, 2 if kind == Q4_0 else 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1)
        if kind == Q4_0:
            return (d * (q.to(torch.int8) - 8).float()).flatten()
        return (d * q.float() + blocks[:, 2:4].view(torch.float16).float()).flatten()
    import gguf

    values = gguf.quants.dequantize(raw.numpy().reshape(-1, _block_size(kind)[1]), gguf.GGMLQuantizationType(kind))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).flatten()
