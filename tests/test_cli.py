"""The sensorium command: one clear error line and a non-zero exit for bad checkpoints."""

import json
import subprocess
import sys

import pytest

from sensorium.cli import main
from tests.conftest import make_hf_llama


def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    make_hf_llama(tmp_path / "truncated")
    f = tmp_path / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    make_hf_llama(tmp_path / "yarn")
    cfg = json.loads((tmp_path / "yarn" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "notes.gguf").write_bytes(b"GGUF\x03\x00")
    return {
        "missing": (tmp_path / "missing", "no such file"),
        "empty": (tmp_path / "empty", "not a checkpoint folder"),
        "truncated": (tmp_path / "truncated", "cannot read safetensors"),
        "yarn": (tmp_path / "yarn", "rope type 'yarn'"),
        "gguf": (tmp_path / "notes.gguf", "not a readable GGUF"),
    }


def test_bad_checkpoints_give_one_error_line(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()  # drop what writing the fixtures printed
    for name, (path, message) in cases.items():
        rc = main(["generate", "--backbone", str(path), "--tokenizer", str(path), "--prompt", "hi"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, name
        assert len(err.splitlines()) == 1, (name, err)
        assert err.startswith("sensorium: error: ") and str(path) in err and message in err, (name, err)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sensorium.cli", "generate", "--backbone", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no such file or directory")


def test_generate_streams_plain_continuation(smollm2_gguf, capsys):
    rc = main(["generate", "--backbone", str(smollm2_gguf), "--prompt", "1, 2, 3, 4,", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "5" in out


@pytest.mark.parametrize("argv", [["generate"], ["nonsense"], ["data", "shapes", "--out", "x", "--num-eval", "0"],
                                  ["data", "shapes", "--out", "x", "--num", "-3"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    if "data" in argv:
        assert "must be at least 1" in capsys.readouterr().err


def test_data_command_offers_every_synthetic_set():
    from sensorium.cli import SYNTHETIC_SETS
    from sensorium.data.synthetic import GENERATORS

    assert set(SYNTHETIC_SETS) == set(GENERATORS)


def test_a_training_run_leaves_no_process_global_float_state(tmp_path):
    import pytest
    import torch

    from sensorium.cli import main

    with pytest.raises(SystemExit):  # a usage error, but it goes through the Lightning entry point
        main(["fit", "--config", "does-not-exist.yaml"])
    assert torch.tensor(1e-40, dtype=torch.float32).item() != 0.0  # subnormals are representable again
