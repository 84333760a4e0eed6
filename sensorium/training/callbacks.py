"""Training callbacks and Lightning plugins: the atomic checkpoint writer, FSDP for a frozen backbone."""

import contextlib
import importlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy

from sensorium.adapters.artifact import umask


class AdapterExport(L.Callback):
    """Write the adapter folder at every checkpoint and when training ends.

    Under FSDP every rank takes part (the parameters are gathered onto rank 0's CPU) and rank 0 writes.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        _export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = _export(trainer, pl_module)
        if path is not None:
            print(f"adapter written to {path}", file=sys.stderr)


def _export(trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
    if not isinstance(trainer.strategy, FSDPStrategy):
        return pl_module.export_adapter() if trainer.is_global_zero else None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # outside forward, FSDP parameters are shards: gather them (a collective, so on every rank)
    with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True):
        return pl_module.export_adapter() if trainer.is_global_zero else None


class FlushDenormal(L.Callback):
    """Flush denormal floats to zero on CPU (long CPU runs otherwise slow down several-fold)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_flush_denormal(True)


class Deadline(L.Callback):
    """Stop training at a wall-clock time (``at``: seconds since the epoch, as ``time.time()``).

    Unlike the trainer's ``max_time``, which starts counting when the first batch is drawn, a deadline
    also counts what comes before it (data generation, the feature cache), so a sequence of runs can share
    one time budget. Checked after every training batch; at least one step is taken.
    """

    def __init__(self, at: float):
        self.at = float(at)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        due = trainer.strategy.broadcast(time.time() >= self.at)  # rank 0's clock decides for all
        if due:
            trainer.should_stop = True


PARTIAL_PREFIX = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write Lightning checkpoints atomically: into a temporary file beside the target, flushed to disk,
    then renamed over it, so a run killed while saving leaves the previous checkpoint intact.

    Lightning's own writer (2.6) goes through an fsspec transaction whose temporary file lives in
    ``$TMPDIR``: the final move is a rename only when ``$TMPDIR`` is on the checkpoint's filesystem
    (otherwise it copies into the target, which a kill can cut short), nothing is fsynced, and a killed
    save leaves its temporary file in ``$TMPDIR``. Here the temporary file (``.partial-HOST-PID-*.tmp``)
    sits beside the checkpoint; those of dead processes on this host are removed at the next save.
    Remote paths (``s3://...``) keep Lightning's writer.

    Checkpoints are read back with ``weights_only=True``: resuming never unpickles code.

    Use it in a recipe with ``trainer.plugins: [{class_path: sensorium.training.callbacks.AtomicCheckpointIO}]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; a checkpoint gets the usual mode
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True`` whatever the caller or the torch version's default
        asks (before torch 2.6 the default unpickled anything)."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def remove_stale_partials(folder: Path) -> None:
    """Delete temporary checkpoint files left in ``folder`` by killed processes of this host."""
    host = socket.gethostname()
    for p in folder.glob(f"{PARTIAL_PREFIX}{host}-*.tmp"):
        pid = p.name[len(PARTIAL_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class AdapterFSDPStrategy(FSDPStrategy):
    """FSDP for training adapters on a frozen backbone, with options a YAML recipe can spell
    (Lightning's own FSDPStrategy takes its wrap policy and mixed precision as Python objects).

    Every module of a class in ``wrap`` (decoder layers, ViT blocks) becomes an FSDP unit of its own,
    gathered only while it runs; the rest (embedding, head, final norm, encoder stem, the adapter)
    forms the root unit. The adapter must stay in the root unit: fused decoder layers call its blocks
    directly (they are not registered children of the layer), past any FSDP wrapper of their own.
    Frozen and trainable weights then share the root unit, which FSDP allows with ``use_orig_params``.
    FSDP flattens a unit into one tensor of one dtype, so the adapter module keeps every weight in
    float32 under FSDP (sharded: 4 bytes / world size each); gathered weights are cast to
    ``param_dtype`` for compute. Buffers stay float32: rotary frequencies in bf16 lose positions.

    Args:
        wrap: class paths of the modules that become FSDP units.
        activation_checkpointing: class paths of modules whose activations are recomputed in backward
            (less memory, about a third more compute); none by default.
        param_dtype: dtype of the gathered weights (compute).
        reduce_dtype: dtype of the gradient reduce-scatter.
        buffer_dtype: dtype of buffers.
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        state_dict_type: ``"full"``: one checkpoint file (trainable weights only), written by rank 0 through
            the CheckpointIO plugin; ``"sharded"``: a folder per checkpoint, every weight, one file per rank.
        use_orig_params: keep the original parameters visible (needed: frozen and trainable weights share units).
        limit_all_gathers: bound the all-gathers in flight (steadier memory).
        **kwargs: other ``FSDPStrategy`` / ``FullyShardedDataParallel`` options.
    """

    def __init__(
        self,
        wrap: list[str] | None = None,
        activation_checkpointing: list[str] | None = None,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        buffer_dtype: str = "float32",
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        use_orig_params: bool = True,
        limit_all_gathers: bool = True,
        **kwargs: Any,
    ) -> None:
        from torch.distributed.fsdp import MixedPrecision

        wrap_classes = {_import(c) for c in (wrap or ["sensorium.backbone.model.DecoderLayer"])}
        checkpointed = {_import(c) for c in activation_checkpointing} if activation_checkpointing else None
        precision = MixedPrecision(param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype),
                                   buffer_dtype=getattr(torch, buffer_dtype))
        super().__init__(auto_wrap_policy=wrap_classes, activation_checkpointing_policy=checkpointed,
                         mixed_precision=precision, sharding_strategy=sharding_strategy,
                         state_dict_type=state_dict_type, use_orig_params=use_orig_params,
                         limit_all_gathers=limit_all_gathers, **kwargs)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint (file or sharded folder) with ``weights_only=True``: resuming never unpickles."""
        return super().load_checkpoint(checkpoint_path, weights_only=True)
