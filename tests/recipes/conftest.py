"""For the slow end-to-end recipe tests: the pretrained shapes encoder, made once per test session, and
a recipe's fit followed by its test split."""

import json
import time
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


@pytest.fixture(scope="session")
def shapes_encoder(tmp_path_factory) -> tuple[Path, float]:
    """``recipes/image/shapes_encoder.yaml`` run as shipped; returns the encoder file and the minutes it took."""
    import os

    folder = tmp_path_factory.mktemp("encoder")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        t0 = time.perf_counter()
        assert main(["fit", "--config", str(RECIPES / "image/shapes_encoder.yaml")]) == 0
        minutes = (time.perf_counter() - t0) / 60
    finally:
        os.chdir(cwd)
    path = folder / "runs/image/encoder/encoder.safetensors"
    assert path.is_file()
    return path, minutes
