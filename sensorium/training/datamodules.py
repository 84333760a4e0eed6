"""DataModule over webdataset shards; the LightningModule supplies the encoder, sample decoder and collator.

With ``features`` set, the module's frozen encoder runs once over ``root`` (on first use, or when the
shards or the encoder changed) and training and evaluation read the cached outputs instead of media.
"""

import multiprocessing
import sys
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from sensorium.data import features as feature_cache
from sensorium.data.shards import sample_pipeline
from sensorium.data.synthetic import is_current, make_dataset


class ShardDataModule(L.LightningDataModule):
    """Train/val/test splits of webdataset shards under ``root/<split>/``.

    Args:
        root: folder with ``train/``, ``val/`` and ``test/`` shard folders.
        synthetic: name of a synthetic set (``shapes``...) generated into ``root`` on first use when absent.
        num_train: training samples to generate for a synthetic set.
        seed: generation and shuffling seed.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle_buffer: training sample shuffle buffer.
        start_method: worker start method (``forkserver`` for audio: torchaudio threads can deadlock after fork).
        features: folder of cached encoder outputs for ``root`` (built on first use; see :mod:`sensorium.data.features`).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        synthetic: str | None = "shapes",
        num_train: int = 4000,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        start_method: str | None = None,
        features: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)

    def prepare_data(self) -> None:
        self.ensure_source()
        if self.hparams.features:
            self.cache_features(self.trainer.lightning_module, self.hparams.features)

    def ensure_source(self) -> None:
        """Generate the synthetic set into ``root`` when it is absent or made by an older generator."""
        if self.hparams.synthetic and not is_current(self.root, self.hparams.synthetic):
            print(f"generating synthetic '{self.hparams.synthetic}' data into {self.root}", file=sys.stderr)
            make_dataset(self.hparams.synthetic, self.root, num=self.hparams.num_train, seed=self.hparams.seed)

    def cache_features(self, module: L.LightningModule, out: str | Path) -> Path:
        """Encode ``root`` with ``module``'s frozen encoder into ``out`` unless it already holds those features."""
        encoder = module.model.encoders[module.modality]
        if not feature_cache.is_current(out, encoder, self.root):
            print(f"encoding {self.root} once with the frozen {module.modality} encoder into {out}", file=sys.stderr)
            feature_cache.write_features(encoder, module.sample_decoder(), self.root, out, modality=module.modality)
        return Path(out)

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        module = self.trainer.lightning_module
        collate = module.collator()
        if self.hparams.features:
            feature_cache.check_features(self.hparams.features, module.model.encoders[module.modality])
            root, decode = Path(self.hparams.features), module.feature_decoder()
            collate.features = True
        else:
            root, decode = self.root, module.sample_decoder()
        ds = sample_pipeline(root / split, decode, shuffle=self.hparams.shuffle_buffer if train else 0,
                             seed=self.hparams.seed)
        workers = self.hparams.num_workers
        ctx = multiprocessing.get_context(self.hparams.start_method) if workers and self.hparams.start_method else None
        return DataLoader(
            ds, batch_size=self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size),
            collate_fn=collate, num_workers=workers, persistent_workers=train and workers > 0,
            multiprocessing_context=ctx,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
