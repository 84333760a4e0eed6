"""The GPU benchmark's code path, run at its tiny shape on CPU (the lent accelerator is not in CI): it must
build the 1B-recipe-shaped step at a tiny size, train, count FLOPs and generate, and print its table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_path_runs_at_the_tiny_shape_on_cpu():
    out = subprocess.run([sys.executable, "bench/mfu.py", "--gpu", "--shape", "tiny", "--steps", "2", "--warmup", "1",
                          "--gen-repeats", "1", "--new-tokens", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| training step (mean of 2) |", "| MFU vs measured matmul |", "| MFU vs table peak | n/a: no GPU |",
                "8 new tokens (bf16, median of 1) |"):
        assert row in out.stdout, out.stdout
    assert "total" in out.stdout and "GFLOP" in out.stdout
