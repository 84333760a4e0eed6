"""DataModule over webdataset shards; the LightningModule supplies the encoder, sample decoder and collator.

With ``features`` set, the module's frozen encoder runs once over ``root`` (on first use, or when the
shards or the encoder changed) and training and evaluation read the cached outputs instead of media.

Resuming: the training stream's order is a pure function of (seed, epoch, rank, world size) (see
:class:`~sensorium.data.shards.ShardStream`), and the training DataLoader is *stateful* in Lightning's
sense: Lightning stores its ``state_dict()`` (epoch, samples consumed) in every checkpoint and hands it
back on ``--ckpt_path``, so a resumed run skips exactly what the interrupted run had trained on and
reads the same samples in the same batches as an uninterrupted run. Without that state (a checkpoint
of an older sensorium) the interrupted epoch starts again.

Several processes (DDP/FSDP): for training, ranks read disjoint shards; unless ``resampled`` is set to
false, each rank reads its shards pass after pass and every epoch has ``epoch_samples`` samples per
rank, so all ranks run the same number of steps (a rank with fewer batches leaves the others waiting
forever in a collective). For evaluation every rank reads all shards and takes every world-size-th
sample (the last incomplete round left out), which gives every rank the same number of batches too.
"""

import multiprocessing
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from sensorium.data import features as feature_cache
from sensorium.data.shards import ShardStream, count_samples, sample_pipeline
from sensorium.data.synthetic import is_current, make_dataset, read_set_info


class ResumableLoader(DataLoader):
    """The training DataLoader: its position is saved in Lightning checkpoints and restored on resume.

    Args:
        dataset: the training stream.
        progress: ``() -> (epoch, batches of it trained on, epoch finished)`` (the trainer's counters).
        **kwargs: DataLoader options.
    """

    def __init__(self, dataset: ShardStream, *, progress: Callable[[], tuple[int, int, bool]], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.progress = progress
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the epoch and the samples this rank has trained on in it."""
        epoch, batches, finished = self.progress()
        if finished:
            epoch, batches = epoch + 1, 0
        ds = self.dataset
        return {"epoch": epoch, "samples": batches * ds.batch_size, "seed": ds.seed, "world_size": ds.node()[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` on the next iteration."""
        self._resume = dict(state)

    def __iter__(self):
        ds, state, self._resume = self.dataset, self._resume, None
        if state is None:
            ds.set_position(self.progress()[0])
        elif state.get("seed") != ds.seed or state.get("world_size") != ds.node()[1]:
            warnings.warn(f"resuming with another seed or world size than the checkpoint's ({state}): "
                          f"epoch {state.get('epoch')} starts again in a new order", stacklevel=2)
            ds.set_position(int(state["epoch"]))
        else:
            ds.set_position(int(state["epoch"]), int(state["samples"]))
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Train/val/test splits of webdataset shards under ``root/<split>/``.

    Args:
        root: folder with ``train/``, ``val/`` and ``test/`` shard folders.
        synthetic: name of a synthetic set (``shapes``...) generated into ``root`` on first use when absent.
        num_train: training samples to generate for a synthetic set.
        num_eval: validation and test samples (each) to generate for a synthetic set (default: at least 128
            and 256, a twentieth and a tenth of ``num_train``).
        seed: generation and shuffling seed.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle_buffer: training sample shuffle buffer.
        start_method: worker start method (``forkserver`` for audio: torchaudio threads can deadlock after fork).
        features: folder of cached encoder outputs for ``root`` (built on first use; see :mod:`sensorium.data.features`).
        resampled: read each rank's training shards pass after pass, ``epoch_samples`` per epoch (default:
            when training on several processes, so that every rank runs the same number of steps).
        epoch_samples: training samples per epoch per rank for resampled streams (default: the training
            split's sample count, counted from the shard headers, divided by the number of ranks).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        synthetic: str | None = "shapes",
        num_train: int = 4000,
        num_eval: int | None = None,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        start_method: str | None = None,
        features: str | None = None,
        resampled: bool | None = None,
        epoch_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)

    def prepare_data(self) -> None:
        self.ensure_source()
        if self.hparams.features:
            self.cache_features(self.trainer.lightning_module, self.hparams.features)

    def ensure_source(self) -> None:
        """Generate the synthetic set into ``root`` when it is absent or made by an older generator; warn
        when it holds another number of training samples than ``num_train`` (it is used as it is)."""
        if not self.hparams.synthetic:
            return
        if not is_current(self.root, self.hparams.synthetic):
            print(f"generating synthetic '{self.hparams.synthetic}' data into {self.root}", file=sys.stderr)
            make_dataset(self.hparams.synthetic, self.root, num=self.hparams.num_train, seed=self.hparams.seed,
                         num_eval=self.hparams.num_eval)
            return
        splits = (read_set_info(self.root) or {}).get("splits")
        have = splits.get("train") if isinstance(splits, dict) else None
        if have != self.hparams.num_train:
            warnings.warn(f"{self.root} holds {have} training samples, not the {self.hparams.num_train} asked for "
                          "(num_train); it is used as it is: delete the folder to generate the asked size",
                          stacklevel=2)

    def cache_features(self, module: L.LightningModule, out: str | Path) -> Path:
        """Encode ``root`` with ``module``'s frozen encoder into ``out`` unless it already holds those features."""
        encoder = module.model.encoders[module.modality]
        if not feature_cache.is_current(out, encoder, self.root):
            print(f"encoding {self.root} once with the frozen {module.modality} encoder into {out}", file=sys.stderr)
            feature_cache.write_features(encoder, module.sample_decoder(), self.root, out, modality=module.modality)
        return Path(out)

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module
        training_collator = getattr(module, "training_collator", None)  # training-only augmentation, if any
        collate = training_collator() if train and training_collator else module.collator()
        if self.hparams.features:
            feature_cache.check_features(self.hparams.features, module.model.encoders[module.modality])
            root, decode = Path(self.hparams.features), module.feature_decoder()
            collate.features = True
        else:
            root, decode = self.root, module.sample_decoder()
        batch_size = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        world = trainer.world_size
        resampled = train and (self.hparams.resampled if self.hparams.resampled is not None else world > 1)
        epoch_samples = None
        if resampled:
            epoch_samples = self.hparams.epoch_samples or max(1, count_samples(root / split) // world)
        ds = sample_pipeline(root / split, decode, shuffle=self.hparams.shuffle_buffer if train else 0,
                             seed=self.hparams.seed, resampled=resampled, epoch_samples=epoch_samples,
                             batch_size=batch_size, rank=trainer.global_rank, world_size=world,
                             split="shards" if train else "samples")
        workers = self.hparams.num_workers
        ctx = multiprocessing.get_context(self.hparams.start_method) if workers and self.hparams.start_method else None
        options = dict(batch_size=batch_size, collate_fn=collate, num_workers=workers, multiprocessing_context=ctx)
        if train:  # workers start afresh each epoch: they take the stream's position with them
            return ResumableLoader(ds, progress=self._progress, **options)
        return DataLoader(ds, **options)

    def _progress(self) -> tuple[int, int, bool]:
        """The trainer's (epoch, batches trained on in it, whether its last batch was reached)."""
        trainer = self.trainer
        batches = trainer.fit_loop.epoch_loop.batch_progress
        return trainer.current_epoch, batches.current.processed, bool(batches.is_last_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
