"""``sensorium demo``: the embedded default end to end.

Generates the synthetic sets, pretrains the small image and speech encoders, trains the image, video and
speech adapters on the frozen SmolLM2-135M-Instruct with those encoders frozen, composes the three
adapters into one model, evaluates each modality with its adapter alone, inside the composed model, and
inside the composed model with every question asked after an image, clip or speech turn of the two other
modalities (``in a chat``), holds one conversation that mixes an image, a clip and speech, prints a table
and writes an HTML report.

Everything lands in one working folder (``--dir``); stages whose outputs exist are reused, so an
interrupted demo continues where it stopped (``--fresh`` starts over). The full run keeps to a time budget
(``--minutes``, 29 by default): the training stages share what is left of it after the evaluation's
reserve, each in proportion to its weight, and each stops at its own wall-clock deadline, which counts its
data generation and feature caching too; a stage that finishes early leaves its time to the next ones, so a
faster machine trains longer within the same stage shares. The image and speech adapters also train on
chats that start with earlier turns about other media (a tenth and a quarter of their batches), so they
answer nearly as well in a chat; the video adapter, which these minutes do not teach direction, trains on
one-turn chats. ``--quick`` trains for a few steps on small sets to show the pipeline, not the quality.
"""

import html
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensorium.errors import SensoriumError


@dataclass
class Stage:
    """One training run: a shipped recipe with overrides (``both``: for the full and the quick run), the
    file that shows it is done, and its weight in the full run's training time."""

    name: str
    recipe: str
    output: str
    weight: float
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)


MINUTES = 29.0  # the full run's default budget
EVAL_MINUTES = 5.0  # kept from it for composing, evaluating, the conversation and the report (4.4 measured
# on a 2-core machine with a 0.2 TFLOP/s fp32 matmul peak, 3.5 at 0.35)

_QUICK_EVAL = ["--data.num_eval", "32"]  # validation and test sets: the quick evaluation reads 8 test items
_QUICK_ADAPTER = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1",
                  "--data.batch_size", "8", "--data.eval_batch_size", "8", *_QUICK_EVAL]
_QUICK_ENCODER = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--data.num_train", "512",
                  *_QUICK_EVAL]

# weights: about the minutes each stage took (data included) in a 28-minute run on a 2-core machine with a
# 0.35 TFLOP/s fp32 matmul peak; the image encoder's, which counts steps (300), covers a 0.2 TFLOP/s machine
# (5.2 minutes): the adapters learn on its features, and what it leaves goes to the stages after it
STAGES = [
    Stage("image encoder", "image/shapes_encoder.yaml", "runs/image/encoder/encoder.safetensors", 5.5,
          quick=_QUICK_ENCODER),
    Stage("image adapter", "image/shapes.yaml", "runs/image/adapter/manifest.json", 6.0,
          quick=[*_QUICK_ADAPTER, "--data.num_train", "512"],
          # a tenth of the batches later in a chat, at the rate measured for the stage's few minutes
          both=["--model.context_turns", "0.1", "--model.max_len", "160", "--model.lr", "0.0003"]),
    Stage("video adapter", "video/moving_shapes.yaml", "runs/video/adapter/manifest.json", 4.5,
          full=["--data.num_train", "1000"],  # a few minutes see fewer clips than the recipe's 4000
          quick=[*_QUICK_ADAPTER, "--data.num_train", "128"],
          both=["--model.context_turns", "0", "--model.max_len", "64"]),  # one-turn chats: every step counts
    Stage("speech encoder", "speech/spoken_words_encoder.yaml", "runs/speech/encoder/encoder.safetensors", 4.0,
          quick=_QUICK_ENCODER),
    Stage("speech adapter", "speech/spoken_words.yaml", "runs/speech/adapter/manifest.json", 8.0,
          quick=[*_QUICK_ADAPTER, "--data.num_train", "512"],
          both=["--model.context_turns", "0.25"]),  # a quarter of the batches later in a chat, as measured
]


def deadline(now: float, until: float, stage: Stage, rest: Sequence[Stage]) -> float:
    """When ``stage`` must stop (seconds, as ``time.time()``): its weight's part of the time from ``now`` to
    ``until`` that it shares with the stages after it (``rest``, itself excluded)."""
    return now + (until - now) * stage.weight / (stage.weight + sum(s.weight for s in rest))


def _deadline_args(at: float) -> list[str]:
    callback = {"class_path": "sensorium.training.callbacks.Deadline", "init_args": {"at": at}}
    return [f"--trainer.callbacks+={json.dumps(callback)}"]


EVALS = [  # (modality, task, data folder, adapter folder)
    ("image", "image_caption", "data/shapes", "runs/image/adapter"),
    ("video", "video_caption", "data/moving_shapes", "runs/video/adapter"),
    ("speech", "asr", "data/spoken_words", "runs/speech/adapter"),
]


def recipes_dir() -> Path:
    """The shipped recipes (beside the package in a source checkout or an editable install)."""
    here = Path(__file__).resolve().parents[1] / "recipes"
    if not here.is_dir():
        raise SensoriumError(f"the recipes folder is not at {here}; run the demo from a source checkout "
                             "(`pip install -e .` of the repository)")
    return here


def _train(stages: Sequence[Stage], *, quick: bool, log: Any, until: float | None = None) -> dict[str, float]:
    """Run the stages whose outputs are missing; with ``until`` (seconds, as ``time.time()``), they share
    the time left until then by weight. Returns each run stage's minutes."""
    from sensorium.cli import main

    minutes = {}
    pending = [stage for stage in stages if not Path(stage.output).exists()]
    for stage in stages:
        if stage not in pending:
            print(f"[demo] {stage.name}: done already ({stage.output})", file=log)
    for i, stage in enumerate(pending):
        args = ["fit", "--config", str(recipes_dir() / stage.recipe), *stage.both, *(stage.quick if quick else stage.full)]
        budget = ""
        if until is not None:
            now = time.time()
            if until - now < 30:
                raise SensoriumError(f"the demo's time budget is spent before its '{stage.name}' stage; "
                                     "run it again with more --minutes (the stages done are kept)")
            at = deadline(now, until, stage, pending[i + 1:])
            args += _deadline_args(at)
            budget = f" (at most {(at - now) / 60:.1f} min)"
        print(f"[demo] {stage.name}: sensorium fit --config recipes/{stage.recipe}{budget}", file=log, flush=True)
        t0 = time.perf_counter()
        if main(args) != 0 or not Path(stage.output).exists():
            raise SensoriumError(f"demo stage '{stage.name}' failed (recipe {stage.recipe})")
        minutes[stage.name] = (time.perf_counter() - t0) / 60
    return minutes


MODES = ("alone", "composed", "in a chat")  # the table's columns
QUESTIONS = {"image": ("image", "Describe the image."), "video": ("video", "Describe the video."),
             "speech": ("audio", "Repeat after me in English:")}  # modality → (message part type, question)


def _composed() -> Any:
    """The three trained adapters composed on the embedded backbone."""
    import sensorium

    path = sensorium.embedded_backbone_path()
    return sensorium.compose(sensorium.load_backbone(path), [a for *_, a in EVALS],
                             tokenizer=sensorium.load_tokenizer(path))


def chat_context(modality: str, media: Mapping[str, tuple[Path, str]]) -> list[dict[str, Any]]:
    """The earlier turns of the ``in a chat`` evaluation of ``modality``: one turn of each other modality,
    its question about a test item and the item's reference as the answer (``media``: per modality, the
    item's file and reference, as :func:`demo_media` gives them)."""
    turns: list[dict[str, Any]] = []
    for other in (m for m, *_ in EVALS if m != modality):
        kind, question = QUESTIONS[other]
        path, reference = media[other]
        turns += [{"role": "user", "content": [{"type": kind, kind: str(path)}, {"type": "text", "text": question}]},
                  {"role": "assistant", "content": reference}]
    return turns


def _evaluate(media: dict[str, tuple[Path, str]], composed: Any, *, quick: bool, log: Any) -> list[dict[str, Any]]:
    """Each modality's evaluation alone, composed, and composed after turns of the other two modalities
    (``media``: per modality, a test item's file and reference, the turns' media and answers; ``composed``:
    the three adapters' model, reused by those runs)."""
    from sensorium.eval.runner import EvalConfig, evaluate

    every = [adapter for _, _, _, adapter in EVALS]
    rows = []
    for modality, task, data, adapter in EVALS:
        context = chat_context(modality, media)
        scores = {}
        for mode, adapters, turns in (("alone", [adapter], None), ("composed", every, None), ("in a chat", every, context)):
            print(f"[demo] evaluating {modality} ({mode})", file=log, flush=True)
            config = EvalConfig(task=task, adapters=adapters, data=data, max_samples=8 if quick else 128,
                                out=f"reports/{modality}_{mode.replace(' ', '_')}", context=turns)
            scores[mode] = evaluate(config, model=None if mode == "alone" else composed)
        rows.append({"modality": modality, "task": task, **scores})
    return rows


def _first_media(data: str, exts: tuple[str, ...], out: Path) -> tuple[Path, str]:
    """Write the first test item of a shard folder (image, clip or audio) to ``out`` (with its extension);
    returns the file and the item's reference text."""
    import tarfile

    shard = sorted((Path(data) / "test").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.rsplit(".", 1)
            if ext in exts:
                target = out.with_suffix("." + ext)
                target.write_bytes(tar.extractfile(m).read())
                return target, json.loads(tar.extractfile(f"{key}.json").read())["text"]
    raise SensoriumError(f"{shard}: no {'/'.join(exts)} item")


_MEDIA_FILES = {"image": ("image", ("png", "jpg")), "video": ("clip", ("mp4",)), "speech": ("speech", ("flac", "wav"))}
# modality → (the file's name in the media folder, the extensions its test items may have)


def demo_media(data: Mapping[str, str | Path] | None = None, out: str | Path = "media") -> dict[str, tuple[Path, str]]:
    """The first test image, clip and utterance written to ``out``, with their references (``data``: per
    modality, its data folder; by default the demo's)."""
    data = data or {m: d for m, _, d, _ in EVALS}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {m: _first_media(str(data[m]), exts, out / name) for m, (name, exts) in _MEDIA_FILES.items()}


def _conversation(media: dict[str, tuple[Path, str]], model: Any, log: Any) -> list[dict[str, str]]:
    """One conversation with an image, a clip and speech, answered by the composed model turn by turn
    (each medium acts while its turn is the current one; earlier turns read as text: ``media_scope="current"``)."""
    chat: list[dict[str, Any]] = []
    out = []
    for modality, (item, reference) in media.items():
        kind, question = QUESTIONS[modality]
        chat.append({"role": "user", "content": [{"type": kind, kind: str(item)}, {"type": "text", "text": question}]})
        answer = model.generate(chat, max_new_tokens=24, system="").strip()
        chat.append({"role": "assistant", "content": answer})
        out.append({"media": str(item), "question": question, "answer": answer, "reference": reference})
        print(f"[demo] user: <{kind}> {question}\n[demo] assistant: {answer}  (reference: {reference})",
              file=log, flush=True)
    return out


def _headline(summary: dict[str, Any]) -> tuple[str, float]:
    metrics = summary["metrics"]
    for name in ("wer", "direction_accuracy", "colour_and_shape_accuracy", "accuracy", "cider_d"):
        if name in metrics:
            return name, float(metrics[name])
    name = next(iter(metrics))
    return name, float(metrics[name])


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'modality':<8} {'metric':<26} {'adapter alone':>14} {'composed':>10} {'in a chat':>10}"]
    for r in rows:
        name, alone = _headline(r["alone"])
        composed, chat = (float(r[mode]["metrics"][name]) for mode in MODES[1:])
        lines.append(f"{r['modality']:<8} {name:<26} {alone:>14.3f} {composed:>10.3f} {chat:>10.3f}")
    return "\n".join(lines)


def _report(rows: list[dict[str, Any]], chat: list[dict[str, str]], minutes: dict[str, float]) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>sensorium demo</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.3em .8em;"
             "border-bottom:1px solid #ddd}</style><h1>sensorium demo</h1><h2>Scores</h2><table>",
             "<tr><th>modality</th><th>metric</th>" + "".join(f"<th>{m}</th>" for m in MODES)
             + "<th>galleries</th></tr>"]
    for r in rows:
        name, _ = _headline(r["alone"])
        m = r["modality"]
        cells = "".join(f"<td>{float(r[mode]['metrics'][name]):.3f}</td>" for mode in MODES)
        links = " · ".join(f"<a href='{m}_{mode.replace(' ', '_')}/report.html'>{mode}</a>" for mode in MODES)
        parts.append(f"<tr><td>{m}</td><td>{name}</td>{cells}<td>{links}</td></tr>")
    parts.append("</table><p>in a chat: every question follows a turn of each other modality (its medium and "
                 "its reference answer), in the composed model.</p>")
    parts.append("<h2>One conversation, three media</h2><ol>")
    for t in chat:
        parts.append(f"<li><b>{html.escape(Path(t['media']).name)}</b> — {html.escape(t['question'])}<br>"
                     f"<i>{html.escape(t['answer'])}</i> (reference: {html.escape(t['reference'])})</li>")
    parts.append("</ol><h2>Training time</h2><ul>")
    parts += [f"<li>{html.escape(k)}: {v:.1f} min</li>" for k, v in minutes.items()]
    parts.append("</ul>")
    out = Path("reports/index.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def run_demo(folder: str | Path = "sensorium-demo", *, quick: bool = False, fresh: bool = False,
             minutes: float = MINUTES) -> dict[str, Any]:
    """Run the demo in ``folder``; return its scores, the conversation and stage times. The full run's
    training stages end ``EVAL_MINUTES`` before ``minutes`` from now (``--quick`` counts steps instead)."""
    import os

    if not quick and minutes <= EVAL_MINUTES + 1:
        raise SensoriumError(f"--minutes must be more than {EVAL_MINUTES + 1:g} (the evaluation keeps "
                             f"{EVAL_MINUTES:g} of them), got {minutes:g}")
    until = None if quick else time.time() + (minutes - EVAL_MINUTES) * 60
    folder = Path(folder)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    log = sys.stderr
    try:
        t0 = time.perf_counter()
        stage_minutes = _train(STAGES, quick=quick, log=log, until=until)
        media = demo_media()
        composed = _composed()
        rows = _evaluate(media, composed, quick=quick, log=log)
        chat = _conversation(media, composed, log)
        report = _report(rows, chat, stage_minutes)
        total = (time.perf_counter() - t0) / 60
        scores = [{"modality": r["modality"], **{mode: r[mode]["metrics"] for mode in MODES}} for r in rows]
        (Path("reports") / "demo.json").write_text(json.dumps(
            {"scores": scores, "conversation": chat, "minutes": stage_minutes, "total_minutes": total,
             "budget_minutes": None if quick else minutes}, indent=2))
        print("\n" + _table(rows))
        print(f"\nreport: {folder / report}  ({total:.1f} min)")
        return {"rows": rows, "conversation": chat, "minutes": stage_minutes, "total_minutes": total}
    finally:
        os.chdir(cwd)
