"""The ``Deadline`` callback: training stops at a wall-clock time that also counts what came before fit."""

import types

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sensorium.training import callbacks
from sensorium.training.callbacks import Deadline


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _steps(deadline: Deadline, max_steps: int = 20) -> int:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[deadline])
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer.fit(Linear(), DataLoader(data, batch_size=2))
    return trainer.global_step


def test_a_past_deadline_stops_after_the_first_step():
    assert _steps(Deadline(at=0.0)) == 1


def test_training_stops_at_the_deadline(monkeypatch):
    clock = iter(range(1000, 2000))  # each look at the clock is one second later
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=lambda: next(clock)))
    assert _steps(Deadline(at=1006)) == 7  # looked after steps 1..7: 1000..1006


def test_a_far_deadline_leaves_max_steps_in_charge():
    assert _steps(Deadline(at=4e9), max_steps=12) == 12
