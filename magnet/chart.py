"""The training chart: the loss per step, its running average and the validation losses, drawn with Pillow.

`loss_chart(losses, val_losses)` returns an RGB `PIL.Image`; `png_bytes(image)` encodes it. Pillow is imported
when a chart is drawn (ComfyUI ships it; `requirements.txt` lists it), so the rest of the engine never needs it.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

BACKGROUND = (28, 28, 28)
AXES = (115, 115, 115)
GRID = (51, 51, 51)
TEXT = (204, 204, 204)
STEP_LOSS = (89, 115, 153)        # each step's loss: dim
AVERAGE = (89, 204, 255)          # its running average: bright
VALIDATION = (255, 166, 51)       # validation losses: dots joined by a line
SMOOTHING = 0.9                   # running average: avg = 0.9 * avg + 0.1 * loss


def running_average(values: Sequence[float], smoothing: float = SMOOTHING) -> list[float]:
    """The exponential running average the chart and the training log show (the first value starts it)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else smoothing * acc + (1 - smoothing) * v
        out.append(acc)
    return out


def validation_pairs(val_losses) -> list[tuple[float, float]]:
    """Validation losses as finite (step, loss) pairs: given as pairs, or as a plain list (steps 1, 2, ...)."""
    out = []
    for i, v in enumerate(val_losses or []):
        step, loss = (v[0], v[1]) if isinstance(v, (tuple, list)) and len(v) == 2 else (i + 1, v)
        try:
            step, loss = float(step), float(loss)
        except (TypeError, ValueError):
            continue
        if math.isfinite(step) and math.isfinite(loss):
            out.append((step, loss))
    return out


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)      # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.2e}"


def loss_chart(losses: Sequence[float], val_losses=None, width: int = 640, height: int = 360):
    """The chart as an RGB PIL image: each step's loss (dim), its running average (bright) and the validation
    losses (orange dots at their steps, joined), the loss range on the left, steps below, a legend. Steps whose
    loss is not finite are left out; with nothing to draw, the empty axes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (int(width), int(height)), BACKGROUND)
    d = ImageDraw.Draw(img)
    small = _font(12)
    left, right, top, bottom = 58, width - 14, 26, height - 30
    steps = [(i + 1, float(v)) for i, v in enumerate(losses) if math.isfinite(float(v))]
    vals = validation_pairs(val_losses)
    d.text((left, 6), "loss", fill=TEXT, font=small)
    legend = [("each step", STEP_LOSS), ("average", AVERAGE)] + ([("validation", VALIDATION)] if vals else [])
    x = right
    for name, color in reversed(legend):
        w = int(d.textlength(name, font=small))
        x -= w
        d.text((x, 6), name, fill=TEXT, font=small)
        d.line([(x - 18, 13), (x - 5, 13)], fill=color, width=3)
        x -= 30
    for frac in (0.25, 0.5, 0.75):
        y = top + frac * (bottom - top)
        d.line([(left + 1, y), (right, y)], fill=GRID)
    d.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    if not steps and not vals:
        return img
    every = [v for _, v in steps] + [v for _, v in vals]
    lo, hi = min(every), max(every)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(losses), 2, *(int(s) for s, _ in vals))

    def xy(step, v):
        return (left + (step - 1) / (n - 1) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    if steps:
        pts = [xy(s, v) for s, v in steps]
        avg = [xy(s, v) for (s, _), v in zip(steps, running_average([v for _, v in steps]))]
        if len(pts) > 1:
            d.line(pts, fill=STEP_LOSS, width=1)
            d.line(avg, fill=AVERAGE, width=2, joint="curve")
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=AVERAGE)
    if vals:
        vpts = [xy(s, v) for s, v in vals]
        if len(vpts) > 1:
            d.line(vpts, fill=VALIDATION, width=1)
        for px, py in vpts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=VALIDATION)
    for v, y in ((hi, top), ((hi + lo) / 2, (top + bottom) / 2), (lo, bottom)):
        label = _fmt(v)
        d.text((left - 6 - d.textlength(label, font=small), y - 7), label, fill=TEXT, font=small)
    d.text((left, bottom + 8), "1", fill=TEXT, font=small)
    last = f"step {len(losses)}"
    d.text((right - d.textlength(last, font=small), bottom + 8), last, fill=TEXT, font=small)
    return img


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
