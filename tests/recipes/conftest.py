"""The pretrained shapes encoder, made once per test session for the slow end-to-end recipe tests."""

import time
from pathlib import Path

import pytest

from sensorium.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


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
