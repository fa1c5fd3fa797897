"""Titles, scale bars and notes drawn onto the pictures we write (QC thumbnails, screening galleries).

A picture that leaves the run folder (pasted into a report, sent to a colleague) must say what it is
and how big things are on it, so these are drawn into the pixels, not kept beside them. Text is
OpenCV's Hershey font (ASCII: "um" for micrometres), sized to the picture's width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["ScaleBar", "nice_length_um", "draw_text_lines", "add_title_and_scale_bar"]

#: colours (RGB)
INK = (20, 20, 20)
BAR = (0, 0, 0)
PAPER = (255, 255, 255)
_FONT_SCALE_MAX = 0.5
_FONT_SCALE_MIN = 0.3


@dataclass(frozen=True)
class ScaleBar:
    """A drawn scale bar: ``length_um`` micrometres are ``length_px`` picture pixels.

    ``box`` is the bar's filled rectangle ``(x0, y0, x1, y1)`` in the output picture (inclusive
    pixels: the bar covers columns x0..x1).
    """

    length_um: float
    length_px: int
    um_per_px: float
    box: Tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return format_um(self.length_um)


def format_um(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} um"


def nice_length_um(um_per_px: float, width_px: int, fraction: float = 0.25) -> float:
    """The largest 1/2/5 x 10^k µm that spans at most ``fraction`` of ``width_px`` (at least 1 px)."""
    if not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise ValueError(f"µm per pixel must be a positive number, got {um_per_px}")
    target = max(um_per_px, fraction * width_px * um_per_px)
    exp = math.floor(math.log10(target))
    best = 10.0 ** exp
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * 10.0 ** exp <= target * (1 + 1e-9):
            best = m * 10.0 ** exp
    return float(f"{best:.6g}")


def _fit_scale(text: str, width: int, cv2) -> float:
    """Largest font scale <= _FONT_SCALE_MAX at which ``text`` fits ``width`` (not below the minimum)."""
    (w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    return max(_FONT_SCALE_MIN, min(_FONT_SCALE_MAX, (width - 8) / max(w, 1)))


def draw_text_lines(lines: Sequence[str], width: int) -> np.ndarray:
    """A white band ``width`` px wide holding ``lines`` (the first one bold), one below the other."""
    import cv2

    scales = [_fit_scale(t, width, cv2) for t in lines]
    heights = [int(round(22 * s / _FONT_SCALE_MAX)) + 2 for s in scales]
    band = np.full((sum(heights) + 6, width, 3), PAPER, np.uint8)
    y = 4
    for i, (t, s, h) in enumerate(zip(lines, scales, heights)):
        y += h
        cv2.putText(band, t, (4, y - 5), cv2.FONT_HERSHEY_SIMPLEX, s, INK, 2 if i == 0 else 1, cv2.LINE_AA)
    return band


def add_title_and_scale_bar(img: np.ndarray, title_lines: Sequence[str], um_per_px: Optional[float],
                            note: Optional[str] = None) -> Tuple[np.ndarray, Optional[ScaleBar], int]:
    """``img`` with a title band above and a scale-bar band below.

    ``um_per_px``: micrometres per pixel of ``img`` (level-0 MPP x the picture's downsample); None or
    not positive: no bar, the band says why. Returns the new picture, the bar drawn (None if none) and
    the row at which ``img`` now starts (the title band's height).
    """
    import cv2

    h, w = img.shape[:2]
    width = max(w, 160)
    body = np.full((h, width, 3), PAPER, np.uint8)
    body[:, :w] = img[..., :3]
    head = draw_text_lines(list(title_lines), width)
    foot_h = 30
    foot = np.full((foot_h, width, 3), PAPER, np.uint8)
    bar: Optional[ScaleBar] = None
    y_off = head.shape[0] + h
    if um_per_px is not None and um_per_px > 0 and math.isfinite(um_per_px):
        length_um = nice_length_um(um_per_px, w)
        length_px = max(1, int(round(length_um / um_per_px)))
        x0, y0 = 6, 8
        x1, y1 = x0 + length_px - 1, y0 + 5
        foot[y0:y1 + 1, x0:x1 + 1] = BAR
        label = format_um(length_um) + (f"   {note}" if note else "")
        cv2.putText(foot, label, (x1 + 8, y1 + 2), cv2.FONT_HERSHEY_SIMPLEX,
                    _fit_scale(label, max(40, width - x1 - 8), cv2), INK, 1, cv2.LINE_AA)
        bar = ScaleBar(length_um, length_px, float(um_per_px), (x0, y_off + y0, x1, y_off + y1))
    else:
        label = "no scale bar: the slide's microns per pixel are unknown" + (f"   {note}" if note else "")
        cv2.putText(foot, label, (4, 19), cv2.FONT_HERSHEY_SIMPLEX, _fit_scale(label, width, cv2), INK, 1,
                    cv2.LINE_AA)
    return np.ascontiguousarray(np.concatenate([head, body, foot], axis=0)), bar, int(head.shape[0])
