"""Watch Adam for the instability described in "A Theory on Adam Instability in Large-Scale Machine
Learning" (Molybog et al., 2023), and optionally skip the batches that provoke it.

The paper's mechanism: when most gradient entries fall below Adam's ``eps``, or the second-moment
estimate goes stale, Adam's update becomes sign-like and decorrelates from the gradient; loss spikes
follow. So, per optimizer step, the monitor measures what the optimizer actually did (the change of the
trainable weights) against the gradient it was given, the fraction of gradient entries under ``eps``, and
how far the step's loss sits above its recent history. A step whose loss is a spike can be skipped:
neither the weights nor Adam's moments then see that batch (the paper's remedy, at batch granularity).
"""

import math
import statistics
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sensorium.errors import SensoriumError

PREFIX = "stability/"
METRICS = ("update_grad_cosine", "update_norm", "grad_norm", "grad_below_eps", "loss_zscore", "skipped")


class TrainingInstabilityError(SensoriumError, RuntimeError):
    """More consecutive optimizer steps were skipped for loss spikes than ``max_consecutive_skips`` allows."""


class AdamInstabilityMonitor(L.Callback):
    """Log Adam-instability signals every optimizer step and optionally skip loss-spike batches.

    Logged every optimizer step (``pl_module.log(..., on_step=True)``, seen by every logger), NaN where
    a value is undefined for the step:

    - ``stability/update_grad_cosine``: cosine between ``-Δθ`` and the gradient ``g``, both flattened over
      all trainable parameters of the optimizer. ``Δθ = θ_after - θ_before`` is the actual change of the
      weights across the step, so a healthy descent step has a *positive* cosine (plain SGD gives exactly
      1; Adam's first step gives ``‖g‖₁ / (√n ‖g‖₂)``); near 0 means the update has decorrelated from the
      gradient. AdamW's decoupled weight decay is part of ``Δθ`` (it is what the weights did). ``g`` is the
      gradient as the optimizer saw it: after gradient clipping and, under fp16, after unscaling. NaN
      when either vector is zero (a skipped step, or one GradScaler dropped).
    - ``stability/update_norm``: ``‖Δθ‖₂`` (0 for a skipped step).
    - ``stability/grad_norm``: ``‖g‖₂`` (after clipping; NaN for a skipped step).
    - ``stability/grad_below_eps``: fraction of gradient entries with ``|g| < eps``, each parameter
      compared with the ``eps`` of its own param group (NaN for a skipped step).
    - ``stability/loss_zscore``: ``(loss - mean) / std`` (population std) of the step's training loss
      against the last ``window`` non-spike step losses; NaN until ``min_history`` losses are known. A
      non-finite loss scores ``+inf`` at any time.
    - ``stability/skipped``: 1 when the step was skipped, else 0.

    The step's loss is read in ``on_before_backward`` (``trainer.callback_metrics`` and the outputs of
    ``on_train_batch_end`` arrive only after the optimizer step, too late to skip it). With gradient
    accumulation it is the mean over the accumulated batches; under distributed training it is averaged
    over ranks, so every rank takes the same skip decision. The gradient statistics are computed on the
    local parameters (the whole model under DDP; one rank's shard under FSDP).

    Skipping: in ``on_before_optimizer_step`` every gradient of the optimizer is set to ``None``. Adam
    and AdamW (like every ``torch.optim`` optimizer) leave a parameter whose gradient is ``None``
    untouched: no weight change, no weight decay, no moment update, no step count increment — the same
    mechanism Lightning uses when ``training_step`` returns ``None``. The LR scheduler and
    ``trainer.global_step`` still advance. A skipped loss does not enter the window, so a spike cannot
    raise the baseline it is judged against; a loss that spikes without skipping is kept out as well.
    Because of that, a loss that shifts up for good would be skipped forever: after
    ``max_consecutive_skips`` skips in a row the run fails with :class:`TrainingInstabilityError` instead
    of silently not training.

    Requires automatic optimization (one optimizer); optimizers other than the Adam family (param groups
    with ``betas`` and ``eps``) are not monitored. Memory: one flat float32 copy of the trainable
    parameters.

    Args:
        window: number of recent step losses the z-score is computed against.
        min_history: losses needed in the window before a step is scored.
        spike_threshold: a step whose loss z-score exceeds this is a spike.
        skip_on_spike: skip the optimizer step of a spike batch.
        max_consecutive_skips: fail after this many skipped steps in a row (``None``: never).

    Attributes:
        skipped_steps: ``trainer.global_step`` of every skipped step.
        spike_steps: ``trainer.global_step`` of every spike, skipped or not.
        last: the metrics logged for the latest optimizer step (names without the prefix).
    """

    def __init__(
        self,
        *,
        window: int = 50,
        min_history: int = 10,
        spike_threshold: float = 6.0,
        skip_on_spike: bool = False,
        max_consecutive_skips: int | None = 20,
    ) -> None:
        if window < 2:
            raise SensoriumError(f"window must be at least 2, got {window}")
        if not 2 <= min_history <= window:
            raise SensoriumError(f"min_history must be in [2, window={window}], got {min_history}")
        if not spike_threshold > 0:
            raise SensoriumError(f"spike_threshold must be positive, got {spike_threshold}")
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise SensoriumError(f"max_consecutive_skips must be at least 1 or None, got {max_consecutive_skips}")
        self.window = window
        self.min_history = min_history
        self.spike_threshold = spike_threshold
        self.skip_on_spike = skip_on_spike
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps: list[int] = []
        self.spike_steps: list[int] = []
        self.last: dict[str, float] = {}
        self._losses: deque[float] = deque(maxlen=window)
        self._consecutive_skips = 0
        self._active = True
        self._warned_optimizer = False
        self._pending_loss: torch.Tensor | None = None  # summed over the micro-batches of this step
        self._step: dict[str, Any] | None = None  # what on_before_optimizer_step saw, for on_train_batch_end
        self._params: list[tuple[torch.nn.Parameter, float]] = []
        self._snapshot: torch.Tensor | None = None  # (n_trainable,) float32

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = pl_module.automatic_optimization
        if not self._active:
            rank_zero_warn("AdamInstabilityMonitor needs automatic optimization; it is disabled for this run")
        self._pending_loss, self._step = None, None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self._active:
            return
        value = loss.detach().float().clone()  # divided by accumulate_grad_batches; own copy: reduce is in place
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16: the hook sees the scaled loss
            value = value / scaler.get_scale()
        self._pending_loss = value if self._pending_loss is None else self._pending_loss + value

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss, self._pending_loss = self._pending_loss, None
        if not self._active:
            return
        if not _is_adam(optimizer):
            if not self._warned_optimizer:
                rank_zero_warn(f"AdamInstabilityMonitor watches Adam-family optimizers; "
                               f"{type(optimizer).__name__} is not monitored")
                self._warned_optimizer = True
            return

        z, loss_value = None, math.nan
        if loss is not None:
            loss_value = float(trainer.strategy.reduce(loss, reduce_op="mean"))
            z = self._zscore(loss_value)
        spike = z is not None and z > self.spike_threshold
        if trainer.world_size > 1:  # the same decision on every rank, or their weights part ways
            spike = trainer.strategy.reduce_boolean_decision(spike, all=False)
        step = trainer.global_step
        if spike:
            self.spike_steps.append(step)
        skip = spike and self.skip_on_spike

        if skip:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # Adam then leaves the weight and its moments untouched
            self.skipped_steps.append(step)
            self._consecutive_skips += 1
            if self.max_consecutive_skips is not None and self._consecutive_skips > self.max_consecutive_skips:
                raise self._too_many_skips(step, loss_value)
        else:
            self._consecutive_skips = 0
            if loss is not None and not spike and math.isfinite(loss_value):
                self._losses.append(loss_value)
            self._take_snapshot(optimizer)
        self._step = {"z": z, "skipped": skip}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        info, self._step = self._step, None
        if info is None:  # no optimizer step in this batch (accumulating, or not monitored)
            return
        # every metric every step: Lightning would otherwise repeat a metric's last value in the logs
        metrics = dict.fromkeys(METRICS, math.nan)
        metrics["skipped"] = float(info["skipped"])
        if info["z"] is not None:
            metrics["loss_zscore"] = info["z"]
        if info["skipped"]:
            metrics["update_norm"] = 0.0
        else:
            metrics.update(self._update_stats())
        self.last = metrics
        for name, value in metrics.items():
            pl_module.log(PREFIX + name, value, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._params, self._snapshot, self._step, self._pending_loss = [], None, None, None  # free the copy

    # ---------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self._losses), "skipped_steps": list(self.skipped_steps),
            "spike_steps": list(self.spike_steps), "consecutive_skips": self._consecutive_skips,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._losses = deque((float(x) for x in state_dict["losses"]), maxlen=self.window)
        self.skipped_steps = [int(s) for s in state_dict["skipped_steps"]]
        self.spike_steps = [int(s) for s in state_dict["spike_steps"]]
        self._consecutive_skips = int(state_dict["consecutive_skips"])

    # -------------------------------------------------------------------------------------- internals
    def _too_many_skips(self, step: int, loss: float) -> TrainingInstabilityError:
        first = self.skipped_steps[-self._consecutive_skips]
        mean = statistics.fmean(self._losses) if self._losses else math.nan
        return TrainingInstabilityError(
            f"{self._consecutive_skips} consecutive optimizer steps (global steps {first}-{step}) were skipped for "
            f"loss spikes; last loss {loss:.4g} against a mean of {mean:.4g} over the last {len(self._losses)} "
            "steps: training diverged or the loss shifted for good. Raise spike_threshold or "
            "max_consecutive_skips, or set skip_on_spike=False."
        )

    def _zscore(self, loss: float) -> float | None:
        """The loss against the window; ``None`` while the window is too short, ``+inf`` if non-finite."""
        if not math.isfinite(loss):
            return math.inf
        if len(self._losses) < self.min_history:
            return None
        mean = statistics.fmean(self._losses)
        std = statistics.pstdev(self._losses, mu=mean)
        return (loss - mean) / max(std, 1e-8 * max(1.0, abs(mean)))  # a flat window must not divide by 0

    def _take_snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the trainable weights (before the step) into one reused flat float32 buffer."""
        self._params = [(p, float(g["eps"])) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        n = sum(p.numel() for p, _ in self._params)
        if not self._params:
            self._snapshot = None
            return
        if self._snapshot is None or self._snapshot.numel() != n:
            self._snapshot = torch.empty(n, dtype=torch.float32, device=self._params[0][0].device)
        offset = 0
        with torch.no_grad():
            for p, _ in self._params:
                self._snapshot[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                offset += p.numel()

    @torch.no_grad()
    def _update_stats(self) -> dict[str, float]:
        """Update/gradient statistics from the snapshot, the weights after the step and their gradients
        (still in ``.grad``: Lightning zeroes them only at the next step's backward)."""
        if self._snapshot is None:
            return {}
        device = self._snapshot.device
        dot, upd2, grad2, below = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(4))
        entries, offset = 0, 0
        for p, eps in self._params:
            n = p.numel()
            before = self._snapshot[offset : offset + n].to(p.device)
            offset += n
            delta = p.detach().reshape(-1).float() - before  # (n,)
            upd2 += delta.double().square().sum().to(device)
            if p.grad is None:
                continue
            g = p.grad.detach().reshape(-1).float()  # (n,)
            dot -= torch.dot(delta.double(), g.double()).to(device)  # -Δθ · g
            grad2 += g.double().square().sum().to(device)
            below += (g.abs() < eps).sum().to(device)
            entries += n
        dot_v, upd2_v, grad2_v, below_v = torch.stack([dot, upd2, grad2, below]).tolist()  # one sync
        stats = {"update_norm": math.sqrt(upd2_v)}
        if entries:
            stats["grad_norm"] = math.sqrt(grad2_v)
            stats["grad_below_eps"] = below_v / entries
            if upd2_v > 0 and grad2_v > 0:
                stats["update_grad_cosine"] = dot_v / math.sqrt(upd2_v * grad2_v)
        return stats


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam, AdamW and their relatives (fused, 8-bit, NAdam, ...): every param group has betas and eps."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return True
    return bool(optimizer.param_groups) and all("betas" in g and "eps" in g for g in optimizer.param_groups)
