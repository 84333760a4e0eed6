"""Training callbacks."""

import sys

import lightning as L
import torch


class AdapterExport(L.Callback):
    """Write the adapter folder at every checkpoint and when training ends."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            pl_module.export_adapter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = pl_module.export_adapter()
            print(f"adapter written to {path}", file=sys.stderr)


class FlushDenormal(L.Callback):
    """Flush denormal floats to zero on CPU (long CPU runs otherwise slow down several-fold)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_flush_denormal(True)
