"""AdamInstabilityMonitor on a tiny MLP regression: the logged cosine, update norm and eps fraction
against a hand computation of Adam's first step, loss spikes flagged, and skipped steps leaving the
weights and Adam's moments untouched."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sensorium.errors import SensoriumError
from sensorium.training import AdamInstabilityMonitor, TrainingInstabilityError

BATCH = 16
SPIKE_STEP = 30


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in ``rows``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def series(self, name: str) -> list[float]:
        """One value per optimizer step; every stability metric must be logged at every step."""
        rows = [row for row in self.rows if "stability/skipped" in row]
        return [row["stability/" + name] for row in rows]


class Regression(L.LightningModule):
    """An MLP fitting ``sin(x @ w)`` with AdamW; two param groups so each can have its own ``eps``."""

    def __init__(self, *, lr: float = 1e-2, eps: tuple[float, float] = (1e-8, 1e-8),
                 skip_batch: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.lr, self.eps, self.skip_batch = lr, eps, skip_batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if batch_idx == self.skip_batch:
            return None  # Lightning's own way of skipping a step, the reference for the monitor's
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        first, second = self.net[0], self.net[2]
        return torch.optim.AdamW(
            [{"params": first.parameters(), "eps": self.eps[0]}, {"params": second.parameters(), "eps": self.eps[1]}],
            lr=self.lr, weight_decay=0.0,
        )


def make_data(n: int, *, seed: int, spike_at: int | None = None, spike_from: int | None = None,
              scale: float = 1000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples; batch ``spike_at`` (or every batch from ``spike_from`` on) gets targets ``× scale``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ w)  # (n, 1)
    if spike_at is not None:
        y[spike_at * BATCH : (spike_at + 1) * BATCH] *= scale
    if spike_from is not None:
        y[spike_from * BATCH :] *= scale
    return x, y


def fit(monitor: AdamInstabilityMonitor, *, steps: int = 60, model: Regression | None = None,
        model_kw: dict | None = None, callbacks: list[L.Callback] = (), **data_kw) -> tuple[Regression, MemoryLogger]:
    """Train for ``steps`` steps (one epoch, fixed order); the model is seeded unless one is given."""
    L.seed_everything(0, verbose=False)
    model = model or Regression(**(model_kw or {}))
    x, y = make_data(steps * BATCH, seed=1, **data_kw)
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, deterministic=True,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor, *callbacks],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
    return model, logger


def clean_loss(model: Regression) -> float:
    x, y = make_data(512, seed=2)
    with torch.no_grad():
        return F.mse_loss(model.net(x), y).item()


class StepWatcher(L.Callback):
    """Copies the weights and AdamW state before and after batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.before: dict | None = None
        self.after: dict | None = None

    def _copy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        opt = trainer.optimizers[0]
        return {
            "params": [p.detach().clone() for p in pl_module.parameters()],
            "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in pl_module.parameters()],
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.before = self._copy(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.after = self._copy(trainer, pl_module)

    def unchanged(self) -> bool:
        pairs = list(zip(self.before["params"], self.after["params"], strict=True))
        for s0, s1 in zip(self.before["state"], self.after["state"], strict=True):
            assert s0.keys() == s1.keys() == {"step", "exp_avg", "exp_avg_sq"}, "AdamW state should be initialised"
            pairs += [(s0[k], s1[k]) for k in s0]
        return all(torch.equal(a, b) for a, b in pairs)


def test_first_step_matches_hand_computed_adam_update():
    """On Adam's first step the update is ``-lr · g / (|g| + eps)``: the logged cosine, update norm and
    eps fraction (each group with its own eps) must equal what that formula gives."""
    L.seed_everything(0, verbose=False)
    probe = Regression()
    x, y = make_data(BATCH, seed=1)
    reference = copy.deepcopy(probe)
    F.mse_loss(reference.net(x), y).backward()  # the gradient the first step will see
    groups = [[p.grad.reshape(-1) for p in reference.net[i].parameters()] for i in (0, 2)]
    grads = [torch.cat(gs).double() for gs in groups]
    eps = tuple(g.abs().median().item() for g in grads)  # about half of each group's entries fall below
    model = Regression(lr=1e-2, eps=eps)
    model.load_state_dict(probe.state_dict())

    _, logger = fit(AdamInstabilityMonitor(), steps=1, model=model)

    g = torch.cat(grads)
    step = torch.cat([gi / (gi.abs() + e) for gi, e in zip(grads, eps, strict=True)])  # -Δθ / lr
    assert logger.series("update_grad_cosine")[0] == pytest.approx((step @ g / (step.norm() * g.norm())).item(), rel=1e-4)
    assert logger.series("update_norm")[0] == pytest.approx(1e-2 * step.norm().item(), rel=1e-3)
    assert logger.series("grad_norm")[0] == pytest.approx(g.norm().item(), rel=1e-5)
    below = sum((gi.abs() < e).sum().item() for gi, e in zip(grads, eps, strict=True)) / g.numel()
    assert 0.4 < below < 0.6
    assert logger.series("grad_below_eps")[0] == pytest.approx(below)
    assert logger.series("skipped") == [0.0]


def test_healthy_run_positive_cosine_and_no_spike():
    monitor = AdamInstabilityMonitor()
    model, logger = fit(monitor)
    cosines, norms = logger.series("update_grad_cosine"), logger.series("update_norm")
    assert len(cosines) == len(norms) == 60
    # each step's update carries Adam's momentum while the gradient is one mini-batch's, so a single step
    # may dip below 0; the run as a whole must be clearly positive (a flipped sign gives about -0.3)
    assert not any(math.isnan(c) for c in cosines)
    assert sum(cosines) / len(cosines) > 0.2, cosines
    assert sum(c > 0 for c in cosines) >= 0.9 * len(cosines), cosines
    assert all(n > 0 for n in norms)
    assert max(logger.series("grad_below_eps")) < 0.01  # eps 1e-8: no entry that small
    zs = logger.series("loss_zscore")
    assert all(math.isnan(z) for z in zs[:10]) and not any(math.isnan(z) for z in zs[10:])  # min_history=10
    assert max(zs[10:]) < monitor.spike_threshold
    assert monitor.spike_steps == monitor.skipped_steps == []
    assert clean_loss(model) < 0.5 * clean_loss(Regression())  # it did learn


def test_gradient_statistics_are_taken_after_clipping():
    monitor = AdamInstabilityMonitor()
    L.seed_everything(0, verbose=False)
    x, y = make_data(5 * BATCH, seed=1)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=logger, log_every_n_steps=1, gradient_clip_val=1e-3,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    model = Regression()
    reference = copy.deepcopy(model)
    F.mse_loss(reference.net(x[:BATCH]), y[:BATCH]).backward()
    unclipped = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm().item()
    assert unclipped > 0.01  # so clipping at 1e-3 does change the gradient
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert logger.series("grad_norm")[0] == pytest.approx(1e-3, rel=1e-3)
    assert all(n <= 1e-3 * (1 + 1e-4) for n in logger.series("grad_norm"))


def test_loss_spike_is_flagged_and_disturbs_adam():
    monitor = AdamInstabilityMonitor(spike_threshold=6.0)
    watcher = StepWatcher(SPIKE_STEP)
    model, logger = fit(monitor, spike_at=SPIKE_STEP, callbacks=[watcher])
    zs = logger.series("loss_zscore")
    assert zs[SPIKE_STEP] > 1000
    assert max(z for z in zs[10:SPIKE_STEP]) < 6.0
    assert monitor.spike_steps == [SPIKE_STEP]
    assert monitor.skipped_steps == []
    assert logger.series("skipped")[SPIKE_STEP] == 0.0
    assert max(monitor.state_dict()["losses"]) < 10.0  # the spike (~1e5) is not part of the baseline
    assert not watcher.unchanged()  # without skipping the spike batch moves weights and moments


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_skip_on_spike_leaves_weights_and_adam_state_untouched():
    monitor = AdamInstabilityMonitor(spike_threshold=6.0, skip_on_spike=True)
    watcher = StepWatcher(SPIKE_STEP)
    model, logger = fit(monitor, spike_at=SPIKE_STEP, callbacks=[watcher])
    assert monitor.skipped_steps == monitor.spike_steps == [SPIKE_STEP]
    skipped = logger.series("skipped")
    assert skipped[SPIKE_STEP] == 1.0 and sum(skipped) == 1.0
    assert logger.series("update_norm")[SPIKE_STEP] == 0.0
    assert math.isnan(logger.series("update_grad_cosine")[SPIKE_STEP])  # not the previous step's value
    assert not math.isnan(logger.series("update_grad_cosine")[SPIKE_STEP + 1])
    assert watcher.unchanged()
    assert max(monitor.state_dict()["losses"]) < 10.0  # the spike's loss (~1e5) stayed out of the window

    # the whole run equals one where training_step returned None for that batch (Lightning's skip)
    reference, _ = fit(AdamInstabilityMonitor(), spike_at=SPIKE_STEP, model_kw={"skip_batch": SPIKE_STEP})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    # and ends better than the run that took the spike (measured: 0.46 against 0.30)
    unskipped, _ = fit(AdamInstabilityMonitor(), spike_at=SPIKE_STEP)
    assert clean_loss(unskipped) > 1.3 * clean_loss(model)


def test_gradient_accumulation_scores_each_optimizer_step():
    """With two batches per step the spike batch 30 belongs to step 15, which is the one skipped."""
    monitor, logger = AdamInstabilityMonitor(skip_on_spike=True), MemoryLogger()
    L.seed_everything(0, verbose=False)
    x, y = make_data(40 * BATCH, seed=1, spike_at=30)
    trainer = L.Trainer(max_steps=20, accumulate_grad_batches=2, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert len(logger.series("skipped")) == 20
    assert monitor.skipped_steps == [15]
    assert math.isnan(logger.series("update_grad_cosine")[15])


def test_non_finite_loss_is_skipped_even_before_history():
    monitor = AdamInstabilityMonitor(skip_on_spike=True)
    model, logger = fit(monitor, steps=8, spike_at=3, scale=math.nan)
    assert monitor.skipped_steps == [3]
    assert logger.series("loss_zscore")[3] == math.inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    unskipped, _ = fit(AdamInstabilityMonitor(), steps=8, spike_at=3, scale=math.nan)
    assert not all(torch.isfinite(p).all() for p in unskipped.parameters())


def test_too_many_consecutive_skips_fail_the_run():
    monitor = AdamInstabilityMonitor(skip_on_spike=True, max_consecutive_skips=3)
    with pytest.raises(TrainingInstabilityError, match="4 consecutive optimizer steps"):
        fit(monitor, steps=30, spike_from=20)
    assert monitor.skipped_steps == [20, 21, 22, 23]


def test_state_round_trip_and_bad_options():
    monitor = AdamInstabilityMonitor(window=4, min_history=2)
    monitor.load_state_dict({"losses": [1.0, 2.0, 3.0, 4.0, 5.0], "skipped_steps": [7], "spike_steps": [7, 9],
                             "consecutive_skips": 0})
    assert monitor.state_dict()["losses"] == [2.0, 3.0, 4.0, 5.0]  # the window keeps its length
    assert monitor.skipped_steps == [7] and monitor.spike_steps == [7, 9]
    with pytest.raises(SensoriumError, match="min_history"):
        AdamInstabilityMonitor(window=5, min_history=10)
    with pytest.raises(SensoriumError, match="spike_threshold"):
        AdamInstabilityMonitor(spike_threshold=0.0)
