"""The evaluation report: one self-contained HTML page a person can skim instead of reading JSON lines.

At the top, the metrics table and the run's facts (task, samples, skipped, adapters, timings); below it,
a gallery with one card per sample: a thumbnail (the image; for a clip a strip of 4 sampled frames; for
audio its waveform), then per question the prompt, the reference and the prediction, coloured by how
right it is (green: correct, amber: partly, red: wrong). Thumbnails are inline base64 PNGs drawn with
PIL, so the page needs nothing beside itself (no matplotlib, no files, no network).
"""

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

THUMB = 160  # longest side of an image thumbnail, pixels
STRIP_FRAMES, STRIP_HEIGHT = 4, 80  # frames in a clip's strip and their height
PNG_COLOURS = 64  # thumbnails are palette PNGs: a third of the bytes of RGB ones on noisy synthetic images
WAVE_SIZE = (320, 72)  # waveform image (width, height)


# --------------------------------------------------------------------------------------- thumbnails
def png_data_uri(img: Image.Image, *, colours: int | None = PNG_COLOURS) -> str:
    """``data:image/png;base64,...`` of an image, reduced to a palette of ``colours`` (None: as it is)."""
    if colours is not None and img.mode == "RGB":
        img = img.quantize(colours)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_thumbnail(img: Image.Image, size: int = THUMB) -> Image.Image:
    """A copy of ``img`` (RGB) whose longest side is at most ``size`` pixels."""
    out = img.convert("RGB")
    out.thumbnail((size, size))
    return out


def frame_strip(frames: np.ndarray, height: int = STRIP_HEIGHT, gap: int = 2) -> Image.Image:
    """Frames ``(F, H, W, 3)`` uint8 side by side, each scaled to ``height`` pixels, ``gap`` pixels apart."""
    assert frames.ndim == 4 and frames.shape[-1] == 3, f"expected (F, H, W, 3) frames, got {frames.shape}"
    F, H, W, _ = frames.shape
    width = max(1, round(W * height / H))
    strip = Image.new("RGB", (F * width + (F - 1) * gap, height), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(Image.fromarray(frame).resize((width, height)), (i * (width + gap), 0))
    return strip


def waveform_image(wave: np.ndarray, size: tuple[int, int] = WAVE_SIZE) -> Image.Image:
    """The waveform of mono samples drawn as a min/max envelope per pixel column (PIL only)."""
    w, h = size
    img = Image.new("RGB", (w, h), (248, 248, 250))
    d = ImageDraw.Draw(img)
    mid = h // 2
    d.line([(0, mid), (w - 1, mid)], fill=(200, 200, 210))
    x = np.asarray(wave, dtype=np.float32).reshape(-1)
    if x.size == 0:
        return img
    peak = max(float(np.abs(x).max()), 1e-6)
    edges = np.linspace(0, x.size, w + 1).astype(int)
    for col in range(w):
        lo, hi = edges[col], max(edges[col + 1], edges[col] + 1)
        chunk = x[lo:min(hi, x.size)]
        if chunk.size == 0:
            continue
        top = mid - float(chunk.max()) / peak * (mid - 2)
        bottom = mid - float(chunk.min()) / peak * (mid - 2)
        d.line([(col, top), (col, bottom)], fill=(40, 90, 170))
    return img


def placeholder_image(text: str = "no preview", size: tuple[int, int] = (THUMB, THUMB // 2)) -> Image.Image:
    """A grey tile for a sample whose media could not be drawn."""
    img = Image.new("RGB", size, (225, 225, 225))
    ImageDraw.Draw(img).text((8, size[1] // 2 - 6), text, fill=(90, 90, 90))
    return img


# ------------------------------------------------------------------------------------------- report
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:24px 0 8px}
table.metrics{border-collapse:collapse;margin-bottom:12px}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 12px;text-align:left}
table.metrics td.v{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
.meta{color:#555;margin:4px 0}
.filters button{margin-right:6px;padding:3px 10px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
.gallery{display:flex;flex-wrap:wrap;gap:12px;margin-top:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:340px}
.card img{display:block;max-width:100%;margin-bottom:6px;image-rendering:pixelated}
.key{font:11px monospace;color:#888;margin-bottom:4px;word-break:break-all}
.row{border-left:5px solid #999;padding:4px 6px;margin-top:4px;border-radius:3px}
.row div{word-break:break-word}.row b{display:inline-block;width:78px;color:#555;font-weight:500}
.row.correct{border-color:#2e9d48;background:#eaf7ed}.row.partial{border-color:#d89b13;background:#fdf5e2}
.row.wrong{border-color:#d23c3c;background:#fbeaea}.score{float:right;font:11px monospace;color:#666}
.skipped li{font:12px monospace}
"""

_JS = """
function show(s){document.querySelectorAll('.card').forEach(function(c){
  c.style.display=(s==='all'||c.querySelector('.row.'+s))?'':'none';});}
"""


def status(score: float) -> str:
    """``correct`` (score 1), ``partial`` (above 0) or ``wrong``."""
    return "correct" if score >= 1.0 - 1e-9 else "partial" if score > 0 else "wrong"


def format_value(value: float) -> str:
    """How the report and the CLI print a metric value."""
    return f"{value:.3f}"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _context_text(content: Any) -> str:
    """A context message's content as one line: text, and each medium as ``[kind: file]``."""
    if isinstance(content, str):
        return content
    return " ".join(p["text"] if p["type"] == "text" else f"[{p['type']}: {p[p['type']]}]" for p in content)


def render_report(
    summary: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    thumbnails: Mapping[int, str | None],
    *,
    skipped: Sequence[Mapping[str, Any]] = (),
    limit: int | None = None,
) -> str:
    """The report page.

    Args:
        summary: what ``metrics.json`` holds (task, metrics, n, skipped, adapters, timings).
        predictions: the prediction rows (``sample`` index, ``key``, ``prompt``, ``reference``, ``prediction``,
            ``score``); rows of one sample (several questions about one clip) share a card.
        thumbnails: sample index → data URI of its thumbnail (None: a grey tile).
        skipped: ``{"url", "key", "reason"}`` of the samples that could not be decoded.
        limit: most cards in the gallery (the metrics always cover every sample).
    """
    task = summary.get("task", "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sensorium eval: {_esc(task)}</title>"
             f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
             f"<h1>sensorium eval — {_esc(task)}</h1>", "<table class='metrics'><tr><th>metric</th><th>value</th></tr>"]
    for name, value in summary.get("metrics", {}).items():
        parts.append(f"<tr><td>{_esc(name)}</td><td class='v'>{format_value(value)}</td></tr>")
    parts.append("</table>")
    timings = ", ".join(f"{k} {v:.1f} s" if k.endswith("_s") else f"{k} {v:.2f}"
                        for k, v in summary.get("timings", {}).items())
    parts += [
        f"<p class='meta'>{summary.get('n', 0)} scored, {summary.get('samples', summary.get('n', 0))} samples, "
        f"{summary.get('skipped', 0)} skipped; split <code>{_esc(summary.get('data', ''))}</code></p>",
        f"<p class='meta'>adapters: {', '.join(f'<code>{_esc(a)}</code>' for a in summary.get('adapters', []))}; "
        f"backbone <code>{_esc(summary.get('backbone', ''))}</code></p>",
        f"<p class='meta'>system: <code>{_esc(json.dumps(summary.get('system')))}</code>; timings: {_esc(timings)}</p>",
    ]
    if summary.get("context"):
        turns = "".join(f"<li>{_esc(m['role'])}: {_esc(_context_text(m['content']))}</li>" for m in summary["context"])
        parts.append(f"<p class='meta'>each question follows these turns:</p><ol class='meta'>{turns}</ol>")
    cards: dict[int, list[Mapping[str, Any]]] = {}
    for row in predictions:
        cards.setdefault(row["sample"], []).append(row)
    counts = {s: sum(status(r["score"]) == s for r in predictions) for s in ("correct", "partial", "wrong")}
    parts.append("<div class='filters'><button onclick=\"show('all')\">all</button>"
                 + "".join(f"<button onclick=\"show('{s}')\">{s} ({n})</button>" for s, n in counts.items()) + "</div>")
    shown = list(cards.items())[: limit if limit is not None else None]
    if len(shown) < len(cards):
        parts.append(f"<p class='meta'>showing the first {len(shown)} of {len(cards)} samples</p>")
    parts.append("<div class='gallery'>")
    for sample, rows in shown:
        uri, key = thumbnails.get(sample) or png_data_uri(placeholder_image()), rows[0].get("key")
        parts.append(f"<div class='card'><img src='{uri}' alt='{_esc(key)}'><div class='key'>{_esc(key)}</div>")
        for r in rows:
            parts.append(
                f"<div class='row {status(r['score'])}'><span class='score'>{r['score']:.2f}</span>"
                f"<div><b>prompt</b>{_esc(r.get('prompt'))}</div><div><b>reference</b>{_esc(r.get('reference'))}</div>"
                f"<div><b>prediction</b>{_esc(r.get('prediction'))}</div></div>"
            )
        parts.append("</div>")
    parts.append("</div>")
    if skipped:
        parts.append(f"<h2>skipped ({len(skipped)})</h2><ul class='skipped'>")
        parts += [f"<li>{_esc(s.get('url'))} {_esc(s.get('key'))}: {_esc(s.get('reason'))}</li>" for s in skipped]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["format_value", "frame_strip", "image_thumbnail", "placeholder_image", "png_data_uri", "render_report",
           "status", "waveform_image"]
