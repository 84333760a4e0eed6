"""Image training on a tiny local backbone: bad samples skipped and reported, generate with adapters."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from sensorium.cli import main
from sensorium.data.synthetic import make_dataset
from sensorium.errors import SensoriumError
from tests.conftest import make_hf_llama

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
WORDS = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "small", "large", "red", "green", "blue",
         "yellow", "purple", "orange", "circle", "square", "triangle", "cross", "on", "the", "left", "right", "in",
         "middle", "Describe", "image."]


def tiny_backbone_folder(folder: Path) -> Path:
    make_hf_llama(folder, vocab_size=64)
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "<|im_start|>"}))
    return folder


def _add_bad_samples(shard: Path) -> None:
    """Append a corrupt, a zero-byte and a non-image .jpg (each with a valid caption) to a shard."""
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    good_jpg = next(data for m, data in members if m.name.endswith(".jpg"))
    bad = {"bad-corrupt": good_jpg[: len(good_jpg) // 3], "bad-empty": b"", "bad-text": b"this is not an image"}
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data))
        for key, data in bad.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps({"text": "a red circle"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    backbone = tiny_backbone_folder(root / "backbone")
    data = make_dataset("shapes", root / "shapes", num=40, seed=0)
    for shard in sorted((data / "train").glob("*.tar")):
        _add_bad_samples(shard)
    return root, backbone, data


def _fit(root, backbone, data, *extra) -> list[str]:
    return [
        "fit", "--config", str(RECIPES / "image/shapes.yaml"), "--model.backbone", str(backbone),
        "--model.encoder", json.dumps({"name": "resnet10t", "image_size": 32, "checkpoint": None}), "--model.every", "1",
        "--model.adapter_dir", str(root / "adapter"), "--data.root", str(data), "--data.batch_size", "8",
        "--data.num_workers", "0", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        *extra,
    ]


def test_bad_images_in_a_shard_are_skipped_counted_and_reported(tiny_setup, capsys, monkeypatch):
    root, backbone, data = tiny_setup
    monkeypatch.chdir(root)
    # 43 samples (3 bad) in batches of 16: three steps read the training split exactly once
    assert main(_fit(root, backbone, data, "--model.max_bad_fraction", "0.5", "--data.batch_size", "16",
                     "--trainer.max_steps", "3")) == 0
    err = capsys.readouterr().err
    assert "skipped 3 unreadable samples of 43" in err
    for key, reason in (("bad-corrupt", "not a readable image"), ("bad-empty", "zero bytes"),
                        ("bad-text", "not a readable image")):
        assert any(key in line and reason in line for line in err.splitlines()), (key, err[-2000:])
    assert (root / "adapter" / "manifest.json").is_file()


def test_too_much_bad_data_fails_the_run(tiny_setup, capsys, monkeypatch):
    root, backbone, data = tiny_setup
    monkeypatch.chdir(root)
    rc = main(_fit(root, backbone, data, "--model.max_bad_fraction", "0.01", "--trainer.max_steps", "12",
                   "--model.adapter_dir", str(root / "adapter2")))
    err = capsys.readouterr().err
    assert rc == 2 and "unreadable (more than 1%)" in err and "shard-000000.tar" in err


def test_generate_with_adapter_and_several_images(tiny_setup, capsys, monkeypatch):
    root, backbone, data = tiny_setup
    monkeypatch.chdir(root)
    if not (root / "adapter" / "manifest.json").is_file():
        assert main(_fit(root, backbone, data, "--model.max_bad_fraction", "0.5")) == 0
    import numpy as np

    from sensorium.data.synthetic import render_shapes_sample

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        img, _ = render_shapes_sample(rng)
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    capsys.readouterr()
    base = ["generate", "--backbone", str(backbone), "--adapter", str(root / "adapter"), "--prompt", "Describe the image.",
            "--max-new-tokens", "5"]
    assert main([*base, "--image", str(paths[0])]) == 0
    assert main([*base, "--image", str(paths[0]), "--image", str(paths[1])]) == 0
    assert "tokens/s" in capsys.readouterr().err
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    assert main([*base, "--image", str(root / "broken.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sensorium: error:") and "broken.png" in err and len(err.splitlines()) == 1


def _losses(log_dir: Path) -> list[float]:
    import csv

    (metrics,) = log_dir.rglob("metrics.csv")
    rows = list(csv.DictReader(open(metrics)))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_training_on_cached_features_gives_the_same_loss_curve(tiny_setup, capsys, monkeypatch):
    root, backbone, data = tiny_setup
    monkeypatch.chdir(root)
    common = ["--model.max_bad_fraction", "0.5", "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "5",
              "--trainer.val_check_interval", "5"]
    assert main(_fit(root, backbone, data, *common, "--trainer.logger.init_args.save_dir", str(root / "raw"))) == 0
    raw_err = capsys.readouterr().err
    feats = root / "features"
    assert main(_fit(root, backbone, data, *common, "--data.features", str(feats),
                     "--trainer.logger.init_args.save_dir", str(root / "cached"))) == 0
    err = capsys.readouterr().err
    assert "encoding" in err and (feats / "info.json").is_file()
    raw, cached = _losses(root / "raw"), _losses(root / "cached")
    assert len(raw) == 5 and raw[0] != raw[-1]
    assert cached == pytest.approx(raw, abs=1e-5)
    # bad samples are skipped and counted the same way
    assert [ln for ln in raw_err.splitlines() if "skipped" in ln] == [ln for ln in err.splitlines() if "skipped" in ln]
    # a second run reuses the cache; features of another encoder are refused
    assert main(_fit(root, backbone, data, *common, "--data.features", str(feats), "--trainer.max_steps", "1")) == 0
    assert "encoding" not in capsys.readouterr().err
    from sensorium.data.features import check_features
    from sensorium.encoders.image import ImageEncoder, ImageEncoderSpec

    with pytest.raises(SensoriumError, match="image_size"):
        check_features(feats, ImageEncoder(ImageEncoderSpec(name="resnet10t", image_size=48)))
    # `sensorium features` writes the same shards
    assert main(["features", "--out", str(root / "features2"), *_fit(root, backbone, data)[1:]]) == 0
    def npy_members(path: Path) -> dict[str, bytes]:
        with tarfile.open(path) as t:
            return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".npy")}

    shard = "train/shard-000000.tar"
    first = npy_members(feats / shard)
    assert len(first) == 40 and npy_members(root / "features2" / shard) == first


def test_context_turns_reach_the_training_collator_only(tmp_path):
    from sensorium.encoders import ImageEncoderSpec
    from sensorium.training import ImageAdapterModule

    module = ImageAdapterModule(backbone=str(tiny_backbone_folder(tmp_path / "bb")), every=1, context_turns=0.3,
                                encoder=ImageEncoderSpec(name="resnet10t", image_size=32))
    assert module.training_collator().context_turns == 0.3 and module.collator().context_turns == 0.0
    assert module.training_collator().earlier_kinds == ("video", "speech")


@pytest.mark.parametrize("kwargs,eps", [({}, 1e-8), ({"adam_eps": 1e-13}, 1e-13)])
def test_adam_eps_reaches_every_parameter_group(tmp_path, kwargs, eps):
    import types

    from sensorium.encoders import ImageEncoderSpec
    from sensorium.training import ImageAdapterModule

    module = ImageAdapterModule(backbone=str(tiny_backbone_folder(tmp_path / "bb")), every=1,
                                encoder=ImageEncoderSpec(name="resnet10t", image_size=32), **kwargs)
    module.trainer = types.SimpleNamespace(max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["eps"] for g in optimizer.param_groups] == [eps, eps]


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients():
    """With ``activation_checkpointing`` every decoder layer runs again in the backward, and the adapter's
    gradients are those of the plain step."""
    from tests.tiny import compose_tiny, make_parts, randomise

    bb, enc, xattn, _ = make_parts()
    model = compose_tiny(bb, enc, randomise(xattn))
    tokens = torch.randint(0, bb.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    tokens[:, 1], labels[:, :2] = model.placeholder_ids["image"], -100
    media = {"image": {"inputs": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "counts": [1, 1]}}
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in bb.layers]

    def grads() -> dict[str, torch.Tensor]:
        xattn.zero_grad(set_to_none=True)
        calls.clear()
        model(tokens, media=media, labels=labels).backward()
        return {n: p.grad.clone() for n, p in xattn.named_parameters() if p.grad is not None}

    plain, plain_calls = grads(), len(calls)
    bb.activation_checkpointing = True
    checkpointed, checkpointed_calls = grads(), len(calls)
    assert plain_calls == bb.config.n_layers and checkpointed_calls == 2 * plain_calls
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():  # nothing recorded: the layers run once, as without the flag
        model(tokens, media=media)
    assert len(calls) == bb.config.n_layers
    for h in hooks:
        h.remove()


def test_activation_checkpointing_and_compile_flags_train_like_the_plain_step(tiny_setup, monkeypatch):
    """``--model.activation_checkpointing true`` and ``--model.compile true`` give the plain run's loss curve."""
    root, backbone, data = tiny_setup
    monkeypatch.chdir(root)
    common = ["--model.max_bad_fraction", "0.5", "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "3",
              "--trainer.val_check_interval", "3"]
    curves = {}
    for name, flags in (("plain", []), ("checkpointed", ["--model.activation_checkpointing", "true"]),
                        ("compiled", ["--model.compile", "true"])):
        assert main(_fit(root, backbone, data, *common, *flags, "--trainer.logger.init_args.save_dir",
                         str(root / f"flags_{name}"))) == 0
        curves[name] = _losses(root / f"flags_{name}")
    assert len(curves["plain"]) == 3 and curves["plain"][0] != curves["plain"][-1]
    assert curves["checkpointed"] == pytest.approx(curves["plain"], abs=1e-5)
    assert curves["compiled"] == pytest.approx(curves["plain"], abs=1e-4)
