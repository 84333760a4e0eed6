"""Every shipped recipe parses; the runnable ones train a few steps on generated shards."""

from pathlib import Path

import pytest

from sensorium.cli import main

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def _run(recipe: str, tmp: Path, *extra: str) -> int:
    return main([
        "fit", "--config", f"recipes/{recipe}", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--data.root", str(tmp / "shapes"), "--data.num_train", "64", "--data.batch_size", "4",
        "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp), *extra,
    ])


def test_image_recipes_run(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    encoder = tmp_path / "encoder.safetensors"
    assert _run("image/shapes_encoder.yaml", tmp_path, "--model.out", str(encoder)) == 0
    assert encoder.is_file()
    for recipe, kind in (("image/shapes.yaml", "cross_attention"), ("image/shapes_projection.yaml", "projection")):
        out = tmp_path / kind
        rc = _run(recipe, tmp_path, "--model.encoder.checkpoint", str(encoder), "--model.adapter_dir", str(out),
                  "--trainer.callbacks", "[]", "--trainer.callbacks+=sensorium.training.AdapterExport")
        assert rc == 0
        assert (out / "manifest.json").is_file() and (out / "adapter.safetensors").is_file()
