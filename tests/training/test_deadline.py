"""The ``Deadline`` callback: training stops at a wall-clock time that also counts what came before fit."""

import types

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from sensorium.training import callbacks
from sensorium.training.callbacks import Deadline
from tests.training.test_stability import BATCH, Regression, make_data


def _steps(deadline: Deadline, max_steps: int = 20) -> int:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[deadline])
    trainer.fit(Regression(), DataLoader(TensorDataset(*make_data(32 * BATCH, seed=1)), batch_size=BATCH))
    return trainer.global_step


def test_a_past_deadline_stops_after_the_first_step():
    assert _steps(Deadline(at=0.0)) == 1


def test_training_stops_at_the_deadline(monkeypatch):
    clock = iter(range(1000, 2000))  # each look at the clock is one second later
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=lambda: next(clock)))
    assert _steps(Deadline(at=1006)) == 7  # looked after steps 1..7: 1000..1006


def test_a_far_deadline_leaves_max_steps_in_charge():
    assert _steps(Deadline(at=4e9), max_steps=12) == 12
