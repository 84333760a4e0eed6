"""The GGUF reader against the ``gguf`` package's reader and dequantisation: metadata and every tensor equal."""

import struct

import numpy as np
import pytest
import torch

from sensorium.backbone.gguf_file import GGUFFile
from sensorium.errors import CheckpointError

gguf = pytest.importorskip("gguf")


def reference(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and float32 tensors of the GGUF file at ``path`` as the ``gguf`` package reads them."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensors[t.name] = torch.from_numpy(values.reshape(tuple(reversed(t.shape.tolist()))))
    return fields, tensors


def assert_same_as_reference(path) -> GGUFFile:
    fields, tensors = reference(path)
    ours = GGUFFile(path)
    assert list(ours.fields) == list(fields)
    for key, value in fields.items():
        assert ours.field(key) == value, key
    assert list(ours.tensors) == list(tensors)
    for name, expected in tensors.items():
        got = ours.tensor(name)
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
    return ours


def test_embedded_backbone_reads_as_the_gguf_package_reads_it(smollm2_gguf):
    ours = assert_same_as_reference(smollm2_gguf)
    kinds = {info.type for info in ours.tensors.values()}
    assert {0, 3, 8} <= kinds  # F32, Q4_1 and Q8_0 all checked
    assert len(ours.field("tokenizer.ggml.tokens")) == 49152


def write(path, tensors: dict[str, tuple[np.ndarray, str]], **fields) -> None:
    """A GGUF file with ``tensors`` (name → (float32 values, GGML type)) and extra metadata fields."""
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny — ünïcödé")
    w.add_array("tokenizer.ggml.tokens", ["a", "bé", "<|im_end|>", ""])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 4])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint64("llama.context_length", 2**40)
    for key, value in fields.items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for name, (values, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, values)
        elif kind == "F16":
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_each_tensor_type_dequantises_as_the_gguf_package_does(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(6, 64, generator=g) * 3).numpy()
    write(tmp_path / "t.gguf", {"w": (values, kind), "norm": (np.ones(64, dtype=np.float32), "F32")})
    ours = assert_same_as_reference(tmp_path / "t.gguf")
    assert ours.tensors["w"].shape == (6, 64)
    assert ours.field("general.name") == "tiny — ünïcödé" and ours.field("llama.context_length") == 2**40
    assert ours.field("missing", "default") == "default"
    if kind in ("F32", "F16", "BF16"):
        torch.testing.assert_close(ours.tensor("w"), torch.from_numpy(values), atol=0.02, rtol=0.01)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "t.gguf"
    write(path, {"w": (np.ones((4, 32), dtype=np.float32), "Q8_0")})
    data, w = path.read_bytes(), GGUFFile(path).tensors["w"]
    (tmp_path / "cut.gguf").write_bytes(data[:w.start + w.nbytes - 1])
    with pytest.raises(CheckpointError, match="truncated GGUF file \\(tensor w ends at byte"):
        GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GGUFFile(tmp_path / "header.gguf")
    (tmp_path / "big.gguf").write_bytes(b"GGUF" + struct.pack(">I", 3) + data[8:])
    with pytest.raises(CheckpointError, match="big-endian GGUF files are not supported"):
        GGUFFile(tmp_path / "big.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + struct.pack("<I", 9) + data[8:])
    with pytest.raises(CheckpointError, match="GGUF version 9 is not supported"):
        GGUFFile(tmp_path / "v9.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GGUFFile(tmp_path / "empty.gguf")
    at = data.index(struct.pack("<Q", 1) + b"w") + 9 + 4 + 2 * 8  # the tensor's type, after its name and dims
    assert struct.unpack_from("<I", data, at)[0] == 8  # Q8_0
    (tmp_path / "kind.gguf").write_bytes(data[:at] + struct.pack("<I", 999) + data[at + 4:])
    with pytest.raises(CheckpointError, match="kind.gguf: tensor w: unknown GGML tensor type 999"):
        GGUFFile(tmp_path / "kind.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(CheckpointError, match="no GGUF magic number"):
        GGUFFile(tmp_path / "magic.gguf")
