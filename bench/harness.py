"""Timing, peak-memory and profiling helpers shared by the bench scripts (imported as ``harness``).

The scripts run as ``python bench/<name>.py``, which puts this folder on ``sys.path``.

* :func:`interleaved` times several callables in turns (A, B, A, B, ...) after one warm-up call each, so
  that load from other processes on a shared machine falls on every side alike; report medians.
* :class:`PeakRSS` measures the resident-memory high-water mark of a stretch of code: it resets the
  kernel's counter (``/proc/self/clear_refs`` ← ``5``, Linux ≥ 4.0), reads ``VmRSS`` as the baseline and
  ``VmHWM`` at the end. Without ``clear_refs`` it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss``, whose
  peak cannot be reset, so the baseline there is the peak so far. Run each side in its own process: freed
  heap memory is not always returned to the OS, so one side's leftovers would hide the other's peak.
* :func:`top_ops` runs a callable under ``torch.profiler`` and returns its costliest operators as a table.
"""

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable, taken in turns: ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """``min–max`` of timings, for the shared-machine caveat."""
    return f"{min(xs):.3g}–{max(xs):.3g}"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.delta_mib``: peak resident memory above the level at entry.

    ``m.method`` says which counter was used (``VmHWM`` after a reset, or ``ru_maxrss``).
    """

    def __enter__(self) -> "PeakRSS":
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM reset via /proc/self/clear_refs"
            self.base_kib = _status_kib("VmRSS")
        except OSError:
            self.method = "ru_maxrss (not resettable)"
            self.base_kib = None
        if self.base_kib is None:
            self.method = "ru_maxrss (not resettable)"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_kib = peak
        self.delta_mib = (peak - self.base_kib) / 1024


def top_ops(fn: Callable[[], object], *, rows: int = 12, sort_by: str = "self_cpu_time_total") -> str:
    """The ``rows`` costliest operators of one call of ``fn`` (after one warm-up call), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=48)
