"""Synthetic sets generated on first use: made once, reused, and a size other than the asked one is said."""

import warnings

import pytest

from sensorium.data import synthetic
from sensorium.training import ShardDataModule


def test_a_generated_set_is_reused_and_one_of_another_size_is_kept_with_a_warning(monkeypatch, tmp_path):
    written = []

    def fake_write(samples, folder, *, total, **kw):  # record the sizes; render nothing
        written.append((folder.name, total))
        folder.mkdir(parents=True)
        return []

    monkeypatch.setattr(synthetic, "write_shards", fake_write)
    root = str(tmp_path / "shapes")
    ShardDataModule(root=root, synthetic="shapes", num_train=40).ensure_source()
    assert written == [("train", 40), ("val", 128), ("test", 256)]
    written.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardDataModule(root=root, synthetic="shapes", num_train=40).ensure_source()
    with pytest.warns(UserWarning, match="holds 40 training samples, not the 80 asked for"):
        ShardDataModule(root=root, synthetic="shapes", num_train=80).ensure_source()
    assert written == []
    ShardDataModule(root=root, synthetic="moving-shapes", num_train=80).ensure_source()  # another set: regenerated
    assert written == [("train", 80), ("val", 128), ("test", 256)]
