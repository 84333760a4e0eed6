"""For the slow end-to-end recipe tests: the pretrained shapes encoder and the image, video and speech
recipes' runs, each made once per test session in its own working folder (so further tests can reuse the
trained adapters), and a recipe's fit followed by its test split.

The video and speech recipes bound their training by the clock (``max_time``), and their bars hold on 2-core
machines with a 4096³ fp32 matmul peak of 0.2 TFLOP/s or more; on a slower machine their runs are skipped
with the measured peak in the reason (they would stop too early to learn, and would not fit CI's time)."""

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


MIN_TFLOPS = 0.2  # the slowest 2-core machine the clock-bounded recipes' bars were measured on


@pytest.fixture(scope="session")
def matmul_tflops() -> float:
    """This machine's fp32 matmul peak in TFLOP/s (best of three 4096³ products after a warm-up)."""
    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096**3 / best / 1e12


def _needs_calibrated_machine(tflops: float, recipe: str) -> None:
    if tflops < MIN_TFLOPS:
        pytest.skip(f"{recipe} bounds its training by the clock and its bar holds at a fp32 matmul peak of "
                    f">= {MIN_TFLOPS} TFLOP/s; this machine measures {tflops:.3f}")


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
def video_run(tmp_path_factory, matmul_tflops, shapes_encoder) -> RecipeRun:
    """``recipes/video/moving_shapes.yaml`` on the pretrained frame encoder, then its test split."""
    _needs_calibrated_machine(matmul_tflops, "recipes/video/moving_shapes.yaml")
    return _on_shapes_encoder(tmp_path_factory, shapes_encoder, "video/moving_shapes.yaml", "runs/video")


@pytest.fixture(scope="session")
def speech_run(tmp_path_factory, matmul_tflops) -> RecipeRun:
    """``recipes/speech/spoken_words_encoder.yaml`` then ``spoken_words.yaml``, then the test split."""
    pytest.importorskip("espeakng_loader")
    _needs_calibrated_machine(matmul_tflops, "recipes/speech/spoken_words.yaml")
    with working_folder(tmp_path_factory.mktemp("speech")) as folder:
        t0 = time.perf_counter()
        assert main(["fit", "--config", str(RECIPES / "speech/spoken_words_encoder.yaml")]) == 0
        encoder_minutes = (time.perf_counter() - t0) / 60
        results, minutes = fit_and_test("speech/spoken_words.yaml", "runs/speech")
    return RecipeRun(folder, results, {"encoder": encoder_minutes, "adapter": minutes})
