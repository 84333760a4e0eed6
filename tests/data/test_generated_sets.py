"""Synthetic sets generated on first use: made once, reused, and a size other than the asked one is said."""

import warnings

import pytest

from sensorium.data import synthetic
from sensorium.training import ShardDataModule


@pytest.fixture
def written(monkeypatch) -> list[tuple[str, int]]:
    """The (split, size) of every split generated from now on; nothing is rendered."""
    out = []

    def fake_write(samples, folder, *, total, **kw):
        out.append((folder.name, total))
        folder.mkdir(parents=True)
        return []

    monkeypatch.setattr(synthetic, "write_shards", fake_write)
    return out


def test_a_generated_set_is_reused_and_one_of_another_size_is_kept_with_a_warning(written, tmp_path):
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


def test_num_eval_sets_the_validation_and_test_sizes(written, tmp_path):
    ShardDataModule(root=str(tmp_path / "shapes"), synthetic="shapes", num_train=40, num_eval=16).ensure_source()
    assert written == [("train", 40), ("val", 16), ("test", 16)]
    for bad in ({"num": 0}, {"num": 4, "num_eval": 0}):
        with pytest.raises(ValueError, match="at least one sample per split"):
            synthetic.make_dataset("shapes", tmp_path / "bad", **bad)


def test_a_smaller_test_split_is_the_start_of_the_default_one(tmp_path):
    import tarfile

    def images(root):
        out = []
        for shard in sorted((root / "test").glob("*.tar")):
            with tarfile.open(shard) as tar:
                out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".jpg")]
        return out

    small = synthetic.make_dataset("shapes", tmp_path / "small", num=2, num_eval=3)
    full = synthetic.make_dataset("shapes", tmp_path / "full", num=2)
    assert synthetic.read_set_info(small)["splits"] == {"train": 2, "val": 3, "test": 3}
    assert len(images(small)) == 3 and images(small) == images(full)[:3]
