"""`sensorium demo`: the training stages' shares of the time budget, and `--quick`: the whole pipeline (data,
encoders, three adapters, composition, evaluation, mixed-media conversation, report) on small sets with a few
steps each (slow: several minutes on 2 CPU cores)."""

import io
import json
import time
import types
from pathlib import Path

import pytest

from sensorium import cli, demo
from sensorium.cli import main
from sensorium.errors import SensoriumError


class FakeFit:
    """Stands in for ``sensorium fit`` on a fake clock: each stage takes ``took[stage]`` seconds (or runs to its
    deadline) and writes its output; records every stage's deadline (None: it had none)."""

    def __init__(self, took: dict[str, float]):
        self.now, self.took, self.deadlines = 0.0, took, {}

    def main(self, args: list[str]) -> int:
        stage = next(s for s in demo.STAGES if args[2].endswith(s.recipe))
        extra = [a for a in args if a.startswith("--trainer.callbacks+=")]
        at = json.loads(extra[0].split("=", 1)[1])["init_args"]["at"] if extra else None
        self.deadlines[stage.name] = at
        took = self.took.get(stage.name)
        if at is None:
            self.now += 1.0 if took is None else took
        else:
            self.now = at if took is None else min(at, self.now + took)
        Path(stage.output).parent.mkdir(parents=True, exist_ok=True)
        Path(stage.output).write_text("{}")
        return 0


@pytest.fixture
def fake_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = FakeFit({"image encoder": 60.0})  # the encoder's steps end before its share
    monkeypatch.setattr(cli, "main", fit.main)
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(time=lambda: fit.now, perf_counter=lambda: fit.now))
    return fit


def test_training_stages_share_the_budget_by_weight(fake_fit):
    weights = [s.weight for s in demo.STAGES]
    demo._train(demo.STAGES, quick=False, log=io.StringIO(), until=1000.0)
    at = list(fake_fit.deadlines.values())
    assert list(fake_fit.deadlines) == [s.name for s in demo.STAGES]
    assert at[0] == pytest.approx(1000 * weights[0] / sum(weights))
    # the encoder ended at 60 s: the other stages share the 940 s left, each running to its deadline
    assert at[1] == pytest.approx(60 + 940 * weights[1] / sum(weights[1:]))
    for i in range(2, len(at)):
        assert at[i] - at[i - 1] == pytest.approx(940 * weights[i] / sum(weights[1:]))
    assert at[-1] == pytest.approx(1000.0)


def test_done_stages_are_skipped_and_leave_their_share(fake_fit):
    done = demo.STAGES[:3]
    for s in done:
        Path(s.output).parent.mkdir(parents=True, exist_ok=True)
        Path(s.output).write_text("{}")
    demo._train(demo.STAGES, quick=False, log=io.StringIO(), until=500.0)
    rest = demo.STAGES[3:]
    assert list(fake_fit.deadlines) == [s.name for s in rest]
    assert fake_fit.deadlines[rest[0].name] == pytest.approx(500 * rest[0].weight / sum(s.weight for s in rest))


def test_a_spent_budget_is_refused_with_the_way_out(fake_fit):
    fake_fit.now = 995.0
    with pytest.raises(SensoriumError, match="time budget is spent before its 'image encoder' stage.*--minutes"):
        demo._train(demo.STAGES, quick=False, log=io.StringIO(), until=1000.0)


def test_quick_runs_count_steps_not_time(fake_fit):
    demo._train(demo.STAGES, quick=True, log=io.StringIO())
    assert fake_fit.deadlines == {s.name: None for s in demo.STAGES}


def test_budget_too_small_for_the_evaluation(tmp_path):
    with pytest.raises(SensoriumError, match="--minutes must be more than 6"):
        demo.run_demo(tmp_path / "demo", minutes=5)
    assert not (tmp_path / "demo").exists()


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
    recipe = json.loads((tmp_path / "demo/runs/image/adapter/manifest.json").read_text())["recipe"]
    assert recipe["context_turns"] == 0.1 and recipe["max_len"] == 160 and recipe["lr"] == 0.0003  # and the image adapter
    recipe = json.loads((tmp_path / "demo/runs/video/adapter/manifest.json").read_text())["recipe"]
    assert recipe["context_turns"] == 0 and recipe["max_len"] == 64  # the video stage's few minutes: one-turn chats
    for data, train in (("shapes", 512), ("moving_shapes", 128), ("spoken_words", 512)):  # small quick sets
        info = json.loads((tmp_path / "demo/data" / data / "info.json").read_text())
        assert info["splits"] == {"train": train, "val": 32, "test": 32}, data
    metrics = json.loads((tmp_path / "demo/reports/speech_in_a_chat/metrics.json").read_text())
    assert [m["role"] for m in metrics["context"]] == ["user", "assistant"] * 2  # an image turn, then a clip turn
    print(f"quick demo: {minutes:.1f} min")
