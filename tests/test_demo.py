"""`sensorium demo --quick`: the whole pipeline (data, encoders, three adapters, composition, evaluation,
mixed-media conversation, report) on small sets with a few steps each. Slow: several minutes on 2 CPU cores."""

import json
import time

import pytest

from sensorium.cli import main


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("espeakng_loader")
    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--dir", str(tmp_path / "demo")]) == 0
    minutes = (time.perf_counter() - t0) / 60
    out = capsys.readouterr().out
    for modality in ("image", "video", "speech"):
        assert modality in out
    summary = json.loads((tmp_path / "demo/reports/demo.json").read_text())
    assert [s["modality"] for s in summary["scores"]] == ["image", "video", "speech"]
    assert all(set(s) == {"modality", "alone", "composed", "in a chat"} for s in summary["scores"])
    assert len(summary["conversation"]) == 3 and all(t["answer"] and t["reference"] for t in summary["conversation"])
    index = (tmp_path / "demo/reports/index.html").read_text()
    assert "One conversation, three media" in index
    for name in ("image_alone", "image_composed", "video_alone", "speech_composed", "speech_in_a_chat"):
        assert (tmp_path / "demo/reports" / name / "report.html").is_file()
    recipe = json.loads((tmp_path / "demo/runs/speech/adapter/manifest.json").read_text())["recipe"]
    assert recipe["context_turns"] == 0.25 and recipe["max_len"] == 160  # speech also trained later in a chat
    metrics = json.loads((tmp_path / "demo/reports/speech_in_a_chat/metrics.json").read_text())
    assert [m["role"] for m in metrics["context"]] == ["user", "assistant"] * 2  # an image turn, then a clip turn
    print(f"quick demo: {minutes:.1f} min")
