"""Adapter folders: exact keys, identical reload, backbone checks, bad manifests, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open

from sensorium.adapters import (
    AdapterError,
    AdapterHashWarning,
    AdapterMismatchError,
    load_adapter,
    save_adapter,
)
from sensorium.adapters.artifact import load_encoder
from sensorium.backbone import Llama, LlamaConfig
from tests.tiny import compose_tiny, randomise, tiny_backbone


@pytest.mark.parametrize("kind", ["xattn", "proj"])
def test_saved_adapter_holds_exactly_the_adapter_keys_and_reloads_identically(tmp_path, parts, kind):
    bb, enc, xattn, proj = parts
    adapter = randomise(xattn if kind == "xattn" else proj)
    folder = save_adapter(adapter, tmp_path / "a", backbone=bb, encoder=enc, prompt={"system": ""})
    with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(adapter.state_dict()) == {n for n, _ in adapter.named_parameters()}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["modality"] == "image"
    assert manifest["backbone"]["dim"] == 64 and len(manifest["backbone"]["embedding_sha256"]) == 64
    assert manifest["encoder"]["name"] == "resnet10t" and manifest["encoder"]["weights"] == "encoder.safetensors"

    ph = 512
    tokens = torch.tensor([[3] + [ph] * adapter.tokens_per_item + [5, 6]])
    media = {"image": {"inputs": torch.randn(1, 3, 32, 32), "counts": torch.tensor([1])}}
    with torch.no_grad():
        expected = compose_tiny(bb, enc, adapter)(tokens, media=media)
    bb2 = tiny_backbone()
    reloaded = load_adapter(folder, backbone=bb2)
    enc2 = load_encoder(folder)
    with torch.no_grad():
        got = compose_tiny(bb2, enc2, reloaded)(tokens, media=media)
    assert torch.equal(got, expected)


def test_backbone_of_another_shape_is_refused_naming_both(tmp_path, parts):
    bb, enc, xattn, _ = parts
    folder = save_adapter(xattn, tmp_path / "a", backbone=bb)
    other = Llama(LlamaConfig.from_name("tiny", dim=96, n_heads=4))
    with pytest.raises(AdapterMismatchError, match=r"dim=64.*this backbone has .*dim=96"):
        load_adapter(folder, backbone=other)


def test_fine_tuned_twin_warns_or_fails_with_strict(tmp_path, parts):
    bb, enc, xattn, _ = parts
    folder = save_adapter(xattn, tmp_path / "a", backbone=bb)
    twin = tiny_backbone(seed=5)
    with pytest.warns(AdapterHashWarning):
        load_adapter(folder, backbone=twin)
    with pytest.raises(AdapterMismatchError, match="embedding weights differ"):
        load_adapter(folder, backbone=twin, strict=True)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(format="other"), "not a sensorium-adapter manifest"),
    (lambda m: m.update(kind="telepathy"), "unknown adapter kind 'telepathy'"),
    (lambda m: m["config"].update(dim=65), "has shape"),
    (lambda m: m.pop("config"), "'config' is missing"),
    (lambda m: m["config"].update(attend="sideways"), "config does not build .attend must be"),
])
def test_bad_manifests(tmp_path, parts, edit, message):
    bb, _, xattn, _ = parts
    folder = save_adapter(xattn, tmp_path / "a", backbone=bb)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter folder"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tmp_path)


def test_interrupted_save_keeps_previous_folder(tmp_path, parts, monkeypatch):
    bb, _, xattn, _ = parts
    folder = save_adapter(xattn, tmp_path / "a", backbone=bb)
    before = (folder / "adapter.safetensors").read_bytes()
    import sensorium.adapters.artifact as artifact

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(artifact, "backbone_fingerprint", boom)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(randomise(xattn), folder, backbone=bb)
    assert (folder / "adapter.safetensors").read_bytes() == before
    assert load_adapter(folder) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary leftovers


def test_an_adapter_folder_gets_the_usual_permissions_not_private_temp_ones(tmp_path, parts):
    import os

    bb, enc, xattn, _ = parts
    old = os.umask(0o022)
    try:
        folder = save_adapter(xattn, tmp_path / "a", backbone=bb, encoder=enc)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "adapter.safetensors": 0o644, "encoder.safetensors": 0o644, "manifest.json": 0o644}
