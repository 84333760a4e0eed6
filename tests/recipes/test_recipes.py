"""Every shipped recipe parses; the runnable ones train a few steps on generated shards."""

from pathlib import Path

import pytest
import torch

from sensorium.cli import main

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(p for p in RECIPE_DIR.rglob("*.yaml") if p.parent.name != "eval")  # eval recipes: test_eval_recipe_parses
EVAL_RECIPES = sorted((RECIPE_DIR / "eval").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", EVAL_RECIPES, ids=lambda p: f"eval/{p.name}")
def test_eval_recipe_parses(recipe):
    from sensorium.eval.runner import EvalConfig

    config = EvalConfig.from_yaml(recipe)
    assert config.adapters and config.data.startswith("data/") and config.out
    assert f"sensorium eval --config recipes/eval/{recipe.name}" in recipe.read_text()  # its header says how to run it


def test_eval_recipes_cover_every_task():
    from sensorium.eval.runner import TASKS, EvalConfig

    assert {EvalConfig.from_yaml(r).task for r in EVAL_RECIPES} == set(TASKS)


def _run(recipe: str) -> int:
    return main([
        "fit", "--config", str(RECIPE_DIR / recipe), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1", "--data.num_train", "64", "--data.batch_size", "4", "--data.num_workers", "0",
    ])


def test_image_and_video_recipes_run(tmp_path, monkeypatch):
    """The shipped image and video recipes, unchanged but for their length, in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    assert _run("image/shapes_encoder.yaml") == 0
    assert Path("runs/image/encoder/encoder.safetensors").is_file()
    for recipe, out in (("image/shapes.yaml", "runs/image"), ("image/shapes_projection.yaml", "runs/image_projection"),
                        ("video/moving_shapes.yaml", "runs/video")):
        assert _run(recipe) == 0
        assert (Path(out) / "adapter/manifest.json").is_file() and (Path(out) / "adapter/adapter.safetensors").is_file()
        ckpt = torch.load(Path(out) / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        keys = set(ckpt["state_dict"])
        modality = "video" if "video" in recipe else "image"
        assert keys and all(k.startswith(f"model.adapters.{modality}.") for k in keys), sorted(keys)[:5]


def test_speech_recipes_run(tmp_path, monkeypatch):
    """The shipped speech recipes (CTC encoder, then the adapter on SmolLM2), unchanged but for their length."""
    pytest.importorskip("espeakng_loader")
    monkeypatch.chdir(tmp_path)
    assert _run("speech/spoken_words_encoder.yaml") == 0
    assert Path("runs/speech/encoder/encoder.safetensors").is_file()
    assert _run("speech/spoken_words.yaml") == 0
    assert Path("runs/speech/adapter/manifest.json").is_file()
    ckpt = torch.load("runs/speech/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("model.adapters.speech.") for k in keys), sorted(keys)[:5]
