"""For the slow end-to-end recipe tests: the pretrained shapes encoder and the image, video and speech
recipes' runs, each made once per test session in its own working folder (so further tests can reuse the
trained adapters), and a recipe's fit followed by its test split."""

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sensorium.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def fit_and_test(recipe: str, run_dir: str, *overrides: str) -> tuple[list[dict[str, Any]], float]:
    """``sensorium fit`` then ``sensorium test`` of ``recipes/<recipe>`` (with ``overrides``) on the adapter
    it wrote to ``run_dir/adapter``; returns the test predictions and the minutes the fit took."""
    args = ["--config", str(RECIPES / recipe), *overrides]
    t0 = time.perf_counter()
    assert main(["fit", *args]) == 0
    minutes = (time.perf_counter() - t0) / 60
    assert main(["test", *args, "--model.init_adapter", f"{run_dir}/adapter"]) == 0
    lines = (Path(run_dir) / "test_predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], minutes


@contextlib.contextmanager
def working_folder(folder: Path) -> Iterator[Path]:
    """Run the block in ``folder`` (the recipes' relative paths land there), then go back."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)


@dataclass
class RecipeRun:
    """A recipe's run: its working folder (``data/``, ``runs/``), test predictions and minutes per stage."""

    folder: Path
    results: list[dict[str, Any]]
    minutes: dict[str, float]


@pytest.fixture(scope="session")
def shapes_encoder(tmp_path_factory) -> tuple[Path, float]:
    """``recipes/image/shapes_encoder.yaml`` run as shipped; returns the encoder file and the minutes it took."""
    with working_folder(tmp_path_factory.mktemp("encoder")) as folder:
        t0 = time.perf_counter()
        assert main(["fit", "--config", str(RECIPES / "image/shapes_encoder.yaml")]) == 0
        minutes = (time.perf_counter() - t0) / 60
    path = folder / "runs/image/encoder/encoder.safetensors"
    assert path.is_file()
    return path, minutes


def _on_shapes_encoder(tmp_path_factory, shapes_encoder, recipe: str, run_dir: str) -> RecipeRun:
    encoder, encoder_minutes = shapes_encoder
    with working_folder(tmp_path_factory.mktemp(Path(run_dir).name)) as folder:
        results, minutes = fit_and_test(recipe, run_dir, "--model.encoder.checkpoint", str(encoder))
    return RecipeRun(folder, results, {"encoder": encoder_minutes, "adapter": minutes})


@pytest.fixture(scope="session")
def image_run(tmp_path_factory, shapes_encoder) -> RecipeRun:
    """``recipes/image/shapes.yaml`` on the pretrained encoder, then its test split."""
    return _on_shapes_encoder(tmp_path_factory, shapes_encoder, "image/shapes.yaml", "runs/image")


@pytest.fixture(scope="session")
def video_run(tmp_path_factory, shapes_encoder) -> RecipeRun:
    """``recipes/video/moving_shapes.yaml`` on the pretrained frame encoder, then its test split."""
    return _on_shapes_encoder(tmp_path_factory, shapes_encoder, "video/moving_shapes.yaml", "runs/video")


@pytest.fixture(scope="session")
def speech_run(tmp_path_factory) -> RecipeRun:
    """``recipes/speech/spoken_words_encoder.yaml`` then ``spoken_words.yaml``, then the test split."""
    pytest.importorskip("espeakng_loader")
    with working_folder(tmp_path_factory.mktemp("speech")) as folder:
        t0 = time.perf_counter()
        assert main(["fit", "--config", str(RECIPES / "speech/spoken_words_encoder.yaml")]) == 0
        encoder_minutes = (time.perf_counter() - t0) / 60
        results, minutes = fit_and_test("speech/spoken_words.yaml", "runs/speech")
    return RecipeRun(folder, results, {"encoder": encoder_minutes, "adapter": minutes})
