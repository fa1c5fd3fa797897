"""A session as one self-contained HTML file: kept or mailed, it opens anywhere with nothing to fetch.

All pictures are inline ``data:`` PNG/JPEG, the style is inline, and every piece of text from the user,
the model or a file name goes through ``html.escape`` (an answer can hold ``<region>`` tags or anything a
question put there).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from datetime import datetime, timezone
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from slidechat.apps.serve.sessions import Evidence, ServeSession, Turn
from slidechat.inference.evidence import METHOD
from slidechat.utils.errors import SlideChatError, exception_text
from slidechat.wsi.slide import Slide

logger = logging.getLogger(__name__)

#: outline of the top patches on the report's evidence picture: green, apart from the map's red and blue
TOP_BOX_RGBA = (0, 170, 70, 255)

THUMB_SIDE = 640
CROP_SIDE = 192
TOP_CROPS = 3

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#1d2327;line-height:1.45}
h1{font-size:1.4em;margin-bottom:.2em}.meta{color:#50575e;font-size:.92em}
.model{background:#fff4d6;border:1px solid #e0b84c;padding:.5em .8em;border-radius:4px;font-family:monospace}
.turn{border-top:1px solid #dcdcde;padding:1em 0}.q{font-weight:600}
.a{white-space:pre-wrap;background:#f6f7f7;padding:.6em .8em;border-radius:4px}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#50575e;max-width:640px}
img{border:1px solid #c3c4c7;max-width:100%}table{border-collapse:collapse;font-size:.88em}
td,th{border:1px solid #dcdcde;padding:2px 6px;text-align:right}
"""


def _data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _img(img: Image.Image, alt: str, caption: str, fmt: str = "PNG") -> str:
    return (f'<figure><img src="{_data_uri(img, fmt)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


class _SlidePictures:
    """Thumbnail and patch crops of the session's slide, read once per report."""

    def __init__(self, s: ServeSession) -> None:
        self.session = s
        self.mpp: Optional[float] = None
        self.thumb: Optional[Image.Image] = None
        self.error: Optional[str] = None
        self._slide: Optional[Slide] = None
        try:
            self._slide = Slide(s.entry.path)
            self.mpp = self._slide.mpp
            self.thumb = Image.fromarray(self._slide.thumbnail(THUMB_SIDE)).convert("RGB")
        except Exception as e:  # a report still holds the conversation when the slide went missing
            self.error = str(e) if isinstance(e, SlideChatError) else exception_text(e)
            logger.warning("report: slide pictures not drawn: %s", self.error)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()

    def scale(self) -> float:
        assert self.thumb is not None
        return self.thumb.size[0] / self.session.level0_size[0]

    def heat_over_thumb(self, turn: Turn) -> Optional[Image.Image]:
        if self.thumb is None or turn.heatmap_png is None:
            return None
        heat = Image.open(io.BytesIO(turn.heatmap_png)).convert("RGBA").resize(self.thumb.size, Image.BILINEAR)
        out = Image.alpha_composite(self.thumb.convert("RGBA"), heat)
        draw = ImageDraw.Draw(out)
        f = self.scale()
        for i, e in enumerate(turn.evidence[:TOP_CROPS], 1):
            box = (e.x * f, e.y * f, (e.x + e.w) * f, (e.y + e.h) * f)
            draw.rectangle(box, outline=TOP_BOX_RGBA, width=2)
            draw.text((box[0] + 2, box[1] + 1), str(i), fill=TOP_BOX_RGBA)
        return out.convert("RGB")

    def crop(self, e: Evidence) -> Optional[Image.Image]:
        if self._slide is None:
            return None
        try:
            sl = self._slide
            ds = max(1.0, max(e.w, e.h) / CROP_SIDE)
            level = sl.best_level_for_downsample(ds)
            lds = float(sl.level_downsamples[level])
            img = sl.read_region_image((e.x, e.y), level, (max(1, round(e.w / lds)), max(1, round(e.h / lds))))
            img.thumbnail((CROP_SIDE, CROP_SIDE))
            return img.convert("RGB")
        except Exception as ex:  # one unreadable patch does not cost the report
            logger.warning("report: patch crop at (%d, %d) not read: %s", e.x, e.y, exception_text(ex))
            return None


def _field_with_boxes(s: ServeSession, turn: Turn) -> Optional[Image.Image]:
    """The cytology field as the model saw it, with the answer's boxes (level-0 -> field image px)."""
    if s.image is None or s.field is None:
        return None
    img = s.image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    iw, ih = img.size
    fx, fy, fw, fh = s.field["x"], s.field["y"], s.field["w"], s.field["h"]
    sx, sy = iw / fw, ih / fh
    for r in turn.regions:
        box = ((r["x"] - fx) * sx, (r["y"] - fy) * sy, (r["x"] + r["w"] - fx) * sx, (r["y"] + r["h"] - fy) * sy)
        draw.rectangle(box, outline=(255, 0, 200), width=3)
        if r.get("label"):
            draw.text((box[0] + 3, box[1] + 2), str(r["label"]), fill=(255, 0, 200))
    return img


def _evidence_table(evidence: List[Evidence]) -> str:
    rows = "".join(f"<tr><td>{i}</td><td>{e.x}</td><td>{e.y}</td><td>{e.w}</td><td>{e.h}</td>"
                   f"<td>{e.score:+.4g}</td></tr>" for i, e in enumerate(evidence, 1))
    return ("<table><tr><th>#</th><th>x</th><th>y</th><th>w</th><th>h</th><th>score</th></tr>"
            f"{rows}</table>")


def _turn_html(s: ServeSession, pics: _SlidePictures, k: int, turn: Turn) -> str:
    parts = [f'<section class="turn"><div class="q">Q{k}: {html.escape(turn.question)}</div>',
             f'<div class="a">{html.escape(turn.answer)}</div>']
    heat = pics.heat_over_thumb(turn)
    if heat is not None:
        parts.append(_img(heat, f"evidence map of answer {k}",
                          f"Evidence of answer {k} ({METHOD}); red: the patch raised the answer's "
                          f"likelihood (for it), blue: lowered it (against), pale: little effect, each "
                          f"scaled by the largest |score|; green boxes: the top "
                          f"{min(TOP_CROPS, len(turn.evidence))} patches.", "JPEG"))
    for i, e in enumerate(turn.evidence[:TOP_CROPS], 1):
        crop = pics.crop(e)
        if crop is not None:
            parts.append(_img(crop, f"patch {i}", f"#{i} at ({e.x}, {e.y}) level-0 px, score {e.score:+.3g}",
                              "JPEG"))
    if turn.evidence:
        parts.append(_evidence_table(turn.evidence))
    field_img = _field_with_boxes(s, turn)
    if field_img is not None:
        f = s.field or {}
        parts.append(_img(field_img, f"field of answer {k}",
                          f"Field x={f.get('x')} y={f.get('y')} {f.get('w')}x{f.get('h')} level-0 px; "
                          f"{len(turn.regions)} box(es) from the answer.", "JPEG"))
        if turn.regions:
            rows = "".join(f"<tr><td>{html.escape(str(r.get('label') or ''))}</td><td>{r['x']}</td><td>{r['y']}"
                           f"</td><td>{r['w']}</td><td>{r['h']}</td></tr>" for r in turn.regions)
            parts.append("<table><tr><th>label</th><th>x</th><th>y</th><th>w</th><th>h</th></tr>"
                         f"{rows}</table>")
    parts.append("</section>")
    return "".join(parts)


def _size_text(size: Tuple[int, int], mpp: Optional[float]) -> str:
    text = f"{size[0]} x {size[1]} px (level 0)"
    if mpp:
        text += f", {mpp:.3g} \u00b5m/px ({size[0] * mpp / 1000:.2f} x {size[1] * mpp / 1000:.2f} mm)"
    else:
        text += ", resolution unknown"
    return text


def session_report(s: ServeSession, model_line: str, now: Optional[datetime] = None) -> str:
    """The HTML report of session ``s``: model line, slide, each question and answer with its evidence
    (slide family: heatmap over the thumbnail and the top patches) or boxes (cytology), and the date."""
    now = now or datetime.now(timezone.utc)
    pics = _SlidePictures(s)
    try:
        turns = [_turn_html(s, pics, k, t) for k, t in enumerate(list(s.turns), 1)]
        overview = ""
        if pics.thumb is not None and not any(t.heatmap_png for t in s.turns) and s.field is None:
            overview = _img(pics.thumb, "slide thumbnail", "The slide.", "JPEG")
    finally:
        pics.close()
    error = (f'<p class="meta">Slide pictures not drawn: {html.escape(pics.error)}</p>' if pics.error else "")
    title = f"slidechat report: {s.entry.name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="model">{html.escape(model_line)}</p>'
        f'<p class="meta">Slide {html.escape(s.entry.name)} (id {html.escape(s.entry.id)}): '
        f"{html.escape(_size_text(s.level0_size, pics.mpp))}. Session {html.escape(s.id)}, "
        f"{len(s.turns)} turn(s). Written {html.escape(now.strftime('%Y-%m-%d %H:%M UTC'))} by slidechat serve."
        f"</p>{error}{overview}{''.join(turns)}</body></html>\n")
